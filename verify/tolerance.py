"""The allowance: how far torch may be from the exact reference, per dtype and element.

The reference is exact math (float64 where it can certify itself, else arb balls). The
allowance is what a straightforward evaluation **of the spec as written** may be off by in
the dtype under test, and the same rule serves ``verify.check`` and ``check_function``: a
user's code must be as accurate as the spec's own steps. A comparison at one element allows::

    allowed = SAFETY * u(dtype) * (|reference| + error_bound) + SAFETY * tiny(dtype)

* ``u(dtype)`` is the unit roundoff of the dtype torch computed in (below).
* ``error_bound``, in units of u, is the first-order error model of the formula's steps:
  one rounding per arithmetic step and per op (``verify.reference`` in float64, the exact
  pass's modelled balls in ``verify.balls``), each propagated only to what depends on it.
  An op's kernel model is local to it: ``sigmoid``, ``tanh`` and ``expm1`` compute their
  derivatives from their outputs (``sigmoid * (1 - sigmoid)``), so only the terms through
  them get the rounding of that output; ``pow``'s derivative rounds ``y - 1`` (|log x|
  roundings); a special function (``digamma``) is some tens of ulps off. It grows where the
  point is sensitive: terms that cancel, ``exp`` of a large argument, long sums. A
  well-conditioned point has ``error_bound`` near ``|reference|`` and is held tight.
* The inputs are exact, yet the model gives each of them one rounding: a correct algorithm
  returns the exact result for inputs perturbed that much (backward stability), so the
  bound includes the condition number of the formula at the point (torch's logsumexp
  backward, ``exp(x - y)``, is off by |y| roundings).
* A derivative's bound is at least the formula over the magnitudes of its terms: torch's
  backward sums the same terms in another order.
* A gradient's model follows a backward's steps (the chain rule one op at a time,
  ``verify.lower.sympy.chain_rule``) and a JVP's the forward chain. In the exact pass the
  bound reaches every value of the same formulas with each step rounded by the dtype's own u, so
  second-order terms count where the first-order one vanishes. Where that has no finite
  bound (a rounding reaches a singularity), the check is rejected, never passed.
* ``SAFETY`` covers that torch's kernels round in a different order and take a few more
  steps. It is a constant of the rule, never tuned per spec.
* ``tiny(dtype)``, the smallest normal number, absorbs results that underflow: they are
  judged, not rejected.

Never part of the allowance: a maximum over the spec's points or ops, or the float64
reference's own rounding or overflow (the comparison leaves a distance within the
reference's own error of the allowance to the exact pass, and an overflowing float64 step
sends its point there too). An allowance is a model of the computation, never of the oracle.

A worked example: ``y = tanh(x)`` at x = 25 in float32. The exact derivative is
1 - tanh(25)**2 = 7.7e-22. Its formula's model: tanh rounds once (|y| = 1 unit), y**2 twice
that and once more (3 units), 1 - y**2 once more at the size of its terms (2 units), and
the product with the cotangent once more: 6 units of u. So
``allowed = 16 * 2**-24 * (7.7e-22 + 6) = 5.7e-6``. torch's backward computes 1 - y*y = 0
from the rounded y = 1, within 5.7e-6 of 7.7e-22: it passes. (The float64 reference is 0
too, off by 7.7e-22, far less than its own error bound of 6 * 2**-53 allows, so it
certifies itself.) A backward that returns 1 there is 1 away, and fails; the gradient of
another input, through other ops, gets none of tanh's room.

Claims compare two formulas of the reference, so they use the float64 row.

Kernels that load a narrow dtype, compute in a wider one and store once (most Triton and
CUDA kernels in bfloat16 and float16 compute in float32) state it:
``check_function(..., dtype=torch.bfloat16, compute_dtype=torch.float32)``. The rule above
then models the steps in the compute dtype (its u, its tiny, the exact pass's roundings),
and adds one rounding of the result to the stored dtype, in any rounding mode (toward zero
costs a whole ulp: Triton's interpreter rounds so)::

    allowed = a + 2 u(stored) * (|reference| + a) + tiny(stored),  a = the rule in the compute dtype

That is far tighter than bfloat16 steps throughout (2^-8 per step): a kernel that computes a
long sum in bfloat16 by mistake is caught. What the stored dtype cannot hold (an overflowing
result) is still rejected by the stored dtype's range.

Code that knowingly trades accuracy (a fast approximation, a fused kernel that computes in a
narrower dtype) states it per call: ``check_function(..., rtol=1e-3, atol=1e-6)`` adds
``rtol * |reference| + atol`` to every value and derivative comparison, as
``torch.testing.assert_close`` would, and the report shows the allowance with it.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SAFETY = 16.0


def allowed_error(reference: np.ndarray, error_bound: np.ndarray, dtype: torch.dtype,
                  computed: torch.dtype | None = None) -> np.ndarray:
    """The largest |torch - reference| accepted at each element, by the rule above; for code
    that stores ``dtype`` but computes in ``computed``, by the compute-dtype rule."""
    steps = computed or dtype
    allowed = SAFETY * UNIT_ROUNDOFF[steps] * (np.abs(reference) + error_bound) + SAFETY * torch.finfo(steps).tiny
    if steps == dtype:
        return allowed
    # One rounding of the result, computed within ``allowed``, to the stored dtype: to nearest,
    # or toward zero (a whole ulp), as Triton's interpreter and its fp_downcast_rounding="rtz" do.
    return allowed + 2 * UNIT_ROUNDOFF[dtype] * (np.abs(reference) + allowed) + torch.finfo(dtype).tiny


def extra_allowance(magnitude: np.ndarray, slack: tuple) -> np.ndarray:
    """The caller's explicit extra allowance, ``rtol * |reference| + atol`` (``slack`` is
    (rtol, atol)), for code that knowingly trades accuracy: on top of the rule, never in it."""
    rtol, atol = slack
    return rtol * magnitude + atol


# Values within this factor of the dtype's overflow or underflow threshold are too close to
# call: torch's order of operations may cross it where the formula's does not. float16 has
# 30 binades in all, so it gets a narrower margin.
EDGE_MARGIN = 2.0**10
EDGE_MARGIN_FLOAT16 = 2.0**4


def _edge_margin(dtype: torch.dtype) -> float:
    return EDGE_MARGIN_FLOAT16 if dtype == torch.float16 else EDGE_MARGIN


def representable_limit(dtype: torch.dtype) -> float:
    """Reference values beyond this count as overflow of the dtype (the edge margin below max)."""
    return float(torch.finfo(dtype).max) / _edge_margin(dtype)


def underflow_limit(dtype: torch.dtype) -> float:
    """Nonzero values below this count as underflow of the dtype (the edge margin above tiny)."""
    return float(torch.finfo(dtype).tiny) * _edge_margin(dtype)
