"""The allowance: how far the code under test may be from the exact reference.

The reference is exact math. The allowance is a model of what a correct computation of the
spec in the dtype under test may be off by, written the way torch computes:

* **The inputs are exact**: they are drawn in the dtype.
* **Each op is one kernel.** Its steps round in the dtype it computes in (float32 for the
  half types, as torch's CPU and CUDA kernels do), and its result is stored once in the
  dtype: one more rounding. In float32 and float64 the steps round in the dtype itself.
* **A backward reads what its forward saved, in the stored dtype**: tanh's backward reads
  tanh's rounded output (``1 - y * y``), so a rounding of y near 1 costs 2 |y| roundings of
  y. Every op's backward is one kernel where torch's is (``tanh_backward``); where torch
  composes it of several ops (erf's ``2 / sqrt(pi) * exp(-x**2) * grad``), each of its steps
  rounds in the dtype, and so do the half types' conv and pooling backwards, which accumulate
  in the dtype (``Op.unfused_in``). Gradients from several consumers are summed in the dtype.
* **A rounding** is at most ``u |result|`` (``u`` the unit roundoff below); a division is one
  rounding; a product by a power of two or by a 0-or-1 selector (a gather's Kronecker delta)
  is exact, and so is adding a term that is surely 0; a sum of k terms is off by about
  log2(k) + 1 roundings of its terms' magnitudes; a transcendental function's kernel is off
  by up to one ulp (two roundings), a special function's by the roundings
  ``verify.reference`` states. Outside a kernel, a half type's op still computes in float32
  and rounds its result once to the dtype.
* **Where torch's kernel takes more steps than the formula shows**, the registry says so
  (``Op.kernel_error``, each measured): gelu's vectorized erf in float32, sigmoid's three
  steps, atan's derivative, rsqrt's stored sqrt in the half types, erf's absolute error,
  digamma's absolute error near its zero (a function's, wherever a formula holds it).
* **Underflow** costs a step its relative precision: below the normal range it is off by up
  to the dtype's smallest subnormal numbers, absolutely, and a result below the normal range
  may be flushed to 0.

``verify.reference`` propagates these roundings through the spec's formulas (first order,
each one only to what depends on it) into a bound per element, in units of u, and the exact
pass (``verify.oracle.exact_point``) computes the same model in arb balls. A Hessian-vector
product's bound is ``SECOND_ORDER`` times its formula's. A comparison then allows::

    allowed = ALLOWANCE[dtype] * u(dtype) * bound

``ALLOWANCE`` is the margin over the worst ratio of torch's observed error to the bound, over
every registry op's value, VJP, JVP and HVP in that dtype (``benchmarks/calibration.py``;
torch's recorded findings, ``verify.findings``, aside): 1.5 in float32 and the half types, 2 in
float64, where the float64 reference's own error is as large as the model's bound and
certifying a point in float64 takes the rest. An op whose kernel is off by more than its
formula's model gets a per-op term (``Op.kernel_error``) until its ratio is at most 1, so the
margin holds over every op but where the calibration table of docs/allowance.md says otherwise:
softmax's bfloat16 JVP at a cancellation reaches 1.43 (a margin of 1.05). Its power is measured by
``benchmarks/mutations.py``: zeroed, flipped, dropped, patched and overflowing gradients are
caught on every op in every dtype, and one scaled by 1 + 8u on most (docs/allowance.md).

Kernels that load a narrow dtype, compute in a wider one and store once (most Triton and CUDA
kernels in bfloat16 and float16 compute in float32) state it:
``check_function(..., dtype=torch.bfloat16, compute_dtype=torch.float32)``. The whole
function is then one kernel: every step rounds in the compute dtype, and only what it returns
is stored (the output, which its backward may read, and each gradient), in any rounding mode
(toward zero costs a whole ulp: Triton's interpreter rounds so).

Code that knowingly trades accuracy states it per call: ``check_function(..., rtol=1e-3,
atol=1e-6)`` adds ``rtol * |reference| + atol`` to every value and derivative comparison, as
``torch.testing.assert_close`` would, and the report shows the allowance with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_TYPES = (torch.bfloat16, torch.float16)
# The margin over the model, per dtype, above the worst observed ratio of torch's error to the
# model's bound over every op and check of benchmarks/calibration.py (at most 1 but for the
# exceptions of docs/allowance.md). float64 takes 2: its reference's own error needs a rounding of it.
ALLOWANCE = {torch.float64: 2.0, torch.float32: 1.5, torch.bfloat16: 1.5, torch.float16: 1.5}


# A Hessian-vector product's bound is this many times its formula's: torch's double backward
# composes the backward's own formulas, each rounding (calibrated: up to 5.5 times the
# formula's model, logsumexp's in float32).
SECOND_ORDER = 4


@dataclass(frozen=True)
class Precision:
    """How the code under test rounds: the dtype it stores, the dtype its kernels compute
    in, and whether one kernel computes it all (``compute_dtype`` given: only what it returns
    is stored) or every op stores its result (torch's way)."""

    dtype: torch.dtype
    compute: torch.dtype
    fused: bool = False

    @property
    def u(self) -> float:
        return UNIT_ROUNDOFF[self.dtype]

    @property
    def kernel_ratio(self) -> float:
        """A rounding inside a kernel, in units of the stored dtype's u."""
        return UNIT_ROUNDOFF[self.compute] / UNIT_ROUNDOFF[self.dtype]

    @property
    def float64_ratio(self) -> float:
        """A float64 rounding, in units of the stored dtype's u."""
        return UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[self.dtype]

    @property
    def outer_ratio(self) -> float:
        """A rounding between kernels (a composite backward's steps, the sum of gradients):
        in the stored dtype, unless one kernel computes it all."""
        return self.kernel_ratio if self.fused else 1.0

    @property
    def stores_kernels(self) -> bool:
        """Whether each kernel's result is rounded once more, to the stored dtype."""
        return not self.fused and self.compute != self.dtype

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def precision(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> Precision:
    """The precision model of code in ``dtype``: torch's (the half types' kernels compute in
    float32), or with ``compute_dtype`` one kernel that computes in it."""
    if compute_dtype is not None and compute_dtype != dtype:
        return Precision(dtype, compute_dtype, fused=True)
    return Precision(dtype, torch.float32 if dtype in HALF_TYPES else dtype)


# A step below the normal range is off by up to this many of the dtype's smallest subnormal
# numbers (its spacing there): a kernel takes several steps there, each rounding absolutely
# (torch's float16 logsigmoid backward reads exp(-|x|) saved as a subnormal number). A step
# within UNDERFLOW_REACH times the smallest normal number counts too: its kernel's inner steps
# may be below it (float32 softplus(-87.33) = 1.18e-38 forms exp(-87.33)).
SUBNORMAL_SPACINGS = 8
UNDERFLOW_REACH = 2


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The dtype's smallest positive number; half of it rounds to 0 (in float64, half is 0)."""
    return float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))


def underflow_error(dtype: torch.dtype) -> float:
    """What a step whose result is below ``dtype``'s normal range may be off by, absolutely
    (torch keeps subnormal numbers)."""
    return SUBNORMAL_SPACINGS * smallest_subnormal(dtype)


def underflow_threshold(dtype: torch.dtype) -> float:
    """Below this magnitude a step of ``dtype`` costs ``underflow_error`` (UNDERFLOW_REACH)."""
    return UNDERFLOW_REACH * float(torch.finfo(dtype).tiny)


def allowed_error(bound, model: Precision | torch.dtype, reference=None) -> np.ndarray:
    """The largest |code - reference| accepted for an element whose model bound (in units of
    the stored dtype's u) is ``bound``; where the exact ``reference`` (if given) is below the
    dtype's normal range, at least its smallest normal number: a kernel may flush such a
    result to 0 (torch's sigmoid does, as do GPU kernels built to flush subnormal numbers)."""
    dtype = model.dtype if isinstance(model, Precision) else model
    with np.errstate(invalid="ignore"):
        allowed = ALLOWANCE[dtype] * UNIT_ROUNDOFF[dtype] * np.asarray(bound, dtype=np.float64)
        if reference is None:
            return allowed
        tiny = float(torch.finfo(dtype).tiny)
        return np.where(np.abs(reference) < tiny, np.maximum(allowed, tiny), allowed)


def extra_allowance(magnitude: np.ndarray, slack: tuple) -> np.ndarray:
    """The caller's explicit extra allowance, ``rtol * |reference| + atol`` (``slack`` is
    (rtol, atol)), for code that knowingly trades accuracy: on top of the rule, never in it."""
    rtol, atol = slack
    return rtol * magnitude + atol


def overflows(magnitude, allowed, dtype: torch.dtype) -> np.ndarray:
    """Where a result of this exact magnitude, off by up to ``allowed``, may round to infinity
    in ``dtype``: beyond its largest finite number plus half an ulp there."""
    largest = float(torch.finfo(dtype).max)
    below = float(torch.nextafter(torch.tensor(largest, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    return np.asarray(magnitude) + allowed >= largest + (largest - below) / 2
