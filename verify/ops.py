"""The op registry: the single place that knows each operation.

Each ``Op`` carries its shape rule, its sympy form, its torch form, its domain and torch's
convention at its kinks, so a lowering never hard-codes an operation and adding one is
one entry here plus a test row.

The forms depend on the op's ``kind``:

* ``elementwise``: ``sympy_form(*scalars)`` and ``torch_form(*tensors)`` on broadcast
  arguments. A domain that the formula alone would not reject (``lgamma`` at negative
  numbers) is built into the sympy form as ``nan`` outside it.
* ``reduction``: ``sympy_form(over, **params)``, where ``over`` builds sums, products and
  extrema over the reduced axes (``over.sum(f)``, ``over.count``);
  ``torch_form(tensor, dims, keepdim, **params)``.
* ``axiswise`` (same shape, along one axis): ``sympy_form(along)``, where ``along.here`` is
  the element at the output position and ``along.sum(f, upto_here=...)`` sums along the
  axis; ``torch_form(tensor, dim)``.
* ``structural`` (``@``, ``.T``, reshapes, joins): ``sympy_form(element, index, shapes,
  fresh_index, params)`` builds one output element from argument elements;
  ``torch_form(tensors, params)``.

Torch forms always receive tensors with a leading batch dimension (one row per point), so
dims arrive already shifted past it.

Kinks: the sympy form is written so that sympy's own derivative takes torch's documented
value at the kink (``relu`` as ``Piecewise((x, x > 0), (0, True))`` has derivative 0 at 0,
as torch's ``relu`` does). ``kink`` states that convention for people.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch
import torch.nn.functional as F
from sympy.codegen import cfunctions

from .ir import ShapeError, broadcast_shapes, concrete_dim
from .lower import functions
from .tolerance import HALF_TYPES


@dataclass(frozen=True)
class KernelError:
    """What one of an op's torch kernels may be off by beyond the allowance's model of its
    formula, as calibrated (``benchmarks/calibration.py``): ``roundings`` of its result in the
    dtype it computes in, ``stored_roundings`` in the stored dtype (a buffer it saves and reads
    back), and an ``absolute`` error per dtype. With ``log_roundings``, |log|result|| roundings
    more in the dtype it computes in: a kernel that forms exp(x - max) rounds that shift, and
    its result, about exp(x - max), is off by |x - max| roundings. With
    ``stored_log_roundings``, as many in the stored dtype: ops that store that shift. With
    ``dtypes``, only a kernel in those dtypes under test takes them."""

    roundings: float = 0.0
    stored_roundings: float = 0.0
    absolute: dict = field(default_factory=dict)
    log_roundings: bool = False
    stored_log_roundings: bool = False
    dtypes: tuple = ()

    def applies_to(self, dtype) -> bool:
        return not self.dtypes or dtype in self.dtypes


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    arity: int | None  # None: two or more operands
    sympy_form: Callable
    torch_form: Callable
    infer_shape: Callable  # (operand shapes, params dict) -> shape; raises ShapeError
    domain: str = "all reals"
    kink: str = ""
    params: tuple = ()  # keyword parameters the spec may pass
    max_size: int | None = None  # a cap on drawn sizes, for ops whose sympy form grows fast
    numbers_ok: bool = False  # the torch form takes Python numbers, as user code writes `x**2`
    # How much torch's backward amplifies rounding, as a numpy function of the dtype, the
    # op's output and its operands: sigmoid' computed as y * (1 - y) loses digits as y -> 1,
    # det's backward goes through a solve with the matrix. None where it does not.
    backward_condition: Callable | None = None
    # The same for the forward: inv and det are stable norm-wise (LU), not element-wise.
    forward_condition: Callable | None = None
    # Where the op is defined, as a numpy predicate of its operand values: points outside
    # are rejected with ``domain`` as the reason, even where sympy simplified the op away
    # (x**2 / x is x to sympy, and 0/0 to torch at 0).
    defined: Callable | None = None
    # Where its derivative is, where that is less (sqrt at 0: sympy may have simplified the
    # sqrt away, as in sqrt(x**2), and torch's backward there is 0 * inf).
    differentiable: Callable | None = None
    # Whether torch's kernel keeps its own steps in range wherever the result is (a shifted
    # exp in softmax, a threshold in softplus). Where a step of the sympy form overflows
    # the dtype, the spec's torch lowering does not fail with it: the exact pass decides.
    # Otherwise the kernel computes those steps too, and the point is rejected there.
    stable: bool = False
    # Operand positions that take integers (an index, a label); every other takes reals.
    integer_operands: tuple = ()
    # Parameters that may also follow the operands positionally, as in one_hot(t, c).
    positional_params: tuple = ()
    min_operands: int = 2  # where arity is None
    # What the op gives: "real", "integer" (an argmax: it indexes) or "boolean" (a condition).
    result: str = "real"
    # Operand positions a derivative flows through (None: all); where's condition is not one.
    smooth_operands: tuple | None = None
    # How torch computes the op, for the allowance's model (verify.tolerance): which of its
    # computations are one kernel, whose steps round in the dtype kernels compute in (float32
    # for the half types) and whose result is stored once: "value", "backward" (its VJP, as
    # tanh_backward), "forward" (its JVP). The others are torch ops composed in torch's
    # derivatives.yaml (erf's backward is 2 / sqrt(pi) * exp(-x**2) * grad), or a sequence in
    # the dtype (prod multiplies in it), and every step of theirs rounds in the dtype.
    fused: tuple = ("value",)
    # computation -> the dtypes under test where that fused computation is several kernels
    # after all, each storing in the dtype: the half types' conv and pooling backwards on CPU
    # accumulate their partial sums in the dtype (measured at a cancellation: a bfloat16 conv1d
    # gradient 17% off, avg_pool1d's 6,550 times a one-store bound, overlapping max-pool
    # windows 0.03 off; float16 conv gradients are inf where the gradient is 56067, a finding
    # of docs/findings.md).
    unfused_in: dict = field(default_factory=dict)
    # Whether its backward and JVP read its result, saved in the stored dtype (tanh's backward
    # is 1 - y * y): the model then reads the result with its rounding.
    saves_result: bool = False
    # computation ("value", "backward", "forward") -> KernelError, where calibration found more.
    kernel_error: dict = field(default_factory=dict)
    # For sort and topk: how torch's lowering orders tied elements, "stable" (by position, as
    # the sympy form does) or "any"; each order gives a valid derivative (``verify.acceptance``).
    ties: str = ""
    # For an op along an axis that saves its result: an exponential of its row from that result
    # and the row's sum of exponentials, as its backward reads it (softmax: exp(x) = y * sum).
    saved_exp: Callable | None = None
    # Whether its kernels form each sum of exponentials relative to the largest argument,
    # exp(x - max), as torch's softmax kernels do: the model rounds that shift, and the float64
    # pass stays in range where exp(x) alone overflows (``verify.reference``).
    shifts_exponentials: bool = False

    def smooth_positions(self, count: int) -> tuple:
        """The operand positions a derivative flows through: all but conditions and indices."""
        positions = range(count) if self.smooth_operands is None else self.smooth_operands
        return tuple(k for k in positions if k not in self.integer_operands)


# -- shape rules -----------------------------------------------------------------------


def _elementwise_shape(shapes, params):
    return broadcast_shapes(*shapes)


def normalize_axes(axis, rank: int) -> tuple:
    """``axis`` (None, an int or a tuple of ints, negatives allowed) as sorted positive axes."""
    if axis is None:
        return tuple(range(rank))
    axes = axis if isinstance(axis, tuple) else (axis,)
    normalized = []
    for a in axes:
        if not -rank <= a < rank:
            raise ShapeError(f"axis {a} is out of range for an operand of rank {rank}")
        normalized.append(a % rank)
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"axis {axis} repeats an axis")
    return tuple(sorted(normalized))


def single_axis(params, rank: int) -> int:
    """The one axis of an axiswise op (default: the last)."""
    axis = params.get("axis", -1)
    if isinstance(axis, tuple) or rank == 0:
        raise ShapeError("this op works along one axis of a tensor of rank 1 or more")
    return normalize_axes(axis, rank)[0]


def _reduction_shape(shapes, params):
    (shape,) = shapes
    axes = normalize_axes(params.get("axis"), len(shape))
    if params.get("keepdims", False):
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _axiswise_shape(shapes, params):
    (shape,) = shapes
    single_axis(params, len(shape))
    return shape


def _show(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# -- elementwise -----------------------------------------------------------------------


def _defined(formula, condition):
    """``formula`` where ``condition`` holds, NaN (undefined, so rejected) elsewhere."""
    return sympy.Piecewise((formula, condition), (sympy.nan, True))


def _sinc(a):
    # torch's normalized sinc. At 0 the Taylor polynomial stands in for the removable
    # singularity, so that derivatives there are the limits (sinc''(0) = -pi**2/3).
    z = sympy.pi * a
    return sympy.Piecewise((sympy.sin(z) / z, sympy.Ne(a, 0)), (1 - z**2 / 6 + z**4 / 120 - z**6 / 5040, True))


def _detached(x):
    """``x.detach()``, still a leaf that collects its gradient: ∂o/∂y of a named ``y =
    stop_gradient(x)`` is compared like any node's, while nothing flows on into x."""
    return x.detach().requires_grad_(x.requires_grad)


def _elementwise(name, arity, sympy_form, torch_form, domain="all reals", kink="", defined=None, stable=False,
                 differentiable=None, result="real", smooth_operands=None, fused=("value",), saves_result=False,
                 kernel_error=None):
    return Op(name, "elementwise", arity, sympy_form, torch_form, _elementwise_shape, domain, kink, defined=defined,
              stable=stable, differentiable=differentiable, result=result, smooth_operands=smooth_operands,
              fused=fused, saves_result=saves_result, kernel_error=kernel_error or {})


def _arithmetic(name, sympy_form, torch_form, domain="all reals", defined=None):
    return Op(name, "elementwise", 2, sympy_form, torch_form, _elementwise_shape, domain, numbers_ok=True,
              defined=defined)


def _power_defined(a, b):
    integral = np.equal(b, np.round(b))
    return (a > 0) | (integral & ~((a == 0) & (b < 0)))


def _positive(a):
    return a > 0


def _clamp(x, low, high):
    """min(max(x, low), high) with torch's gradients: to x on [low, high], bounds included;
    to low below it, to high above it or where low > high; to neither where low == high > x."""
    return sympy.Piecewise((x, (x >= low) & (x <= high)), (low, (x < low) & (low < high)),
                           (high, (x > high) | (high < low)), (functions.stop_gradient(high), True))


SOFTPLUS_THRESHOLD = 20  # torch's default: softplus(x) = x above it
# The half types' logsumexp and log_softmax round the sum of exponentials to the dtype before
# its log (over 4 elements, bfloat16 log_softmax([6.5, 0, -1.5, -4.5])[0] is 0, not -0.00185):
# a rounding of the dtype's, absolutely.
# Beyond that, calibration measured 1.1 to 1.4 roundings of the result where the model counts
# one (float16 logsumexp, log_softmax in every dtype): one more store.
ROUNDED_SUM_STORED = KernelError(stored_roundings=1, absolute={torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11})
# One rounding more in the stored dtype than the model counts, as measured (calibration ratios
# of 1.1 to 1.5): rsqrt's half types store the sqrt; float16's hypot backward, silu JVP and
# log_softmax backward, and float64's cumprod, round once more than their formulas show.
ONE_MORE_STORE = KernelError(stored_roundings=1)
# Ops whose backward (and JVP) is one kernel of torch's (tanh_backward, gelu_backward, a matmul).
FUSED = ("value", "backward", "forward")
# Ops whose JVP is several kernels: a product's is mm(dA, B) + mm(A, dB), each stored before
# the sum (measured: float16 matmul JVPs 568 times the fused model's bound, where they cancel).
FUSED_BACKWARD = ("value", "backward")

ELEMENTWISE = [
    _arithmetic("add", lambda a, b: a + b, lambda a, b: a + b),
    _arithmetic("sub", lambda a, b: a - b, lambda a, b: a - b),
    _arithmetic("mul", lambda a, b: a * b, lambda a, b: a * b),
    _arithmetic("div", lambda a, b: a / b, lambda a, b: a / b, domain="b != 0", defined=lambda a, b: b != 0),
    _arithmetic("pow", functions.power, lambda a, b: a**b, domain="a > 0, or b an integer (∂/∂b: a > 0)",
                defined=_power_defined),
    _elementwise("neg", 1, lambda a: -a, torch.neg),
    # A fresh view, so that `y = x` gives y a gradient of its own, as a named node needs.
    _elementwise("pos", 1, lambda a: a, lambda a: a.view_as(a)),
    _elementwise("abs", 1, sympy.Abs, torch.abs, kink="abs'(0) = 0"),
    _elementwise("sign", 1, sympy.sign, torch.sign, kink="sign' = 0 everywhere, 0 included"),
    _elementwise("stop_gradient", 1, functions.stop_gradient, _detached,
                 kink="the value of x; derivative 0 everywhere (torch's detach)"),
    _elementwise("reciprocal", 1, lambda a: 1 / a, torch.reciprocal, domain="x != 0", defined=lambda a: a != 0,
                 saves_result=True),
    _elementwise("square", 1, lambda a: a**2, torch.square),
    _elementwise("sqrt", 1, sympy.sqrt, torch.sqrt, domain="x >= 0 (derivative: x > 0)", defined=lambda a: a >= 0,
                 differentiable=_positive, saves_result=True),
    # The half types' rsqrt stores sqrt before its reciprocal: 1.5 roundings measured.
    _elementwise("rsqrt", 1, lambda a: 1 / sympy.sqrt(a), torch.rsqrt, domain="x > 0", defined=_positive,
                 saves_result=True, kernel_error={"value": ONE_MORE_STORE}),
    _elementwise("exp", 1, sympy.exp, torch.exp, saves_result=True),
    # expm1 and log1p evaluate without the cancellation of exp(x) - 1.
    _elementwise("expm1", 1, functions.expm1, torch.expm1, stable=True, saves_result=True),
    _elementwise("log", 1, sympy.log, torch.log, domain="x > 0", defined=_positive),
    _elementwise("log2", 1, cfunctions.log2, torch.log2, domain="x > 0", defined=_positive),
    _elementwise("log10", 1, cfunctions.log10, torch.log10, domain="x > 0", defined=_positive),
    _elementwise("log1p", 1, cfunctions.log1p, torch.log1p, domain="x > -1", defined=lambda a: a > -1,
                 stable=True),
    _elementwise("sin", 1, sympy.sin, torch.sin),
    _elementwise("cos", 1, sympy.cos, torch.cos),
    _elementwise("tan", 1, sympy.tan, torch.tan, domain="cos(x) != 0", saves_result=True),
    _elementwise("asin", 1, sympy.asin, torch.asin, domain="-1 <= x <= 1 (derivative: |x| < 1)",
                 defined=lambda a: abs(a) <= 1, differentiable=lambda a: abs(a) < 1),
    _elementwise("acos", 1, sympy.acos, torch.acos, domain="-1 <= x <= 1 (derivative: |x| < 1)",
                 defined=lambda a: abs(a) <= 1, differentiable=lambda a: abs(a) < 1),
    # torch's atan derivative and its sigmoid each take more steps than their sympy form
    # counts (1 / (1 + x**2) after a pow; 1 / (1 + exp(-x))): measured up to 2 roundings more.
    _elementwise("atan", 1, sympy.atan, torch.atan,
                 kernel_error=dict.fromkeys(("backward", "forward"), KernelError(roundings=2))),
    _elementwise("sinh", 1, sympy.sinh, torch.sinh),
    _elementwise("cosh", 1, sympy.cosh, torch.cosh),
    _elementwise("tanh", 1, sympy.tanh, torch.tanh, stable=True, fused=FUSED, saves_result=True),
    _elementwise("asinh", 1, sympy.asinh, torch.asinh),
    _elementwise("acosh", 1, sympy.acosh, torch.acosh, domain="x >= 1 (derivative: x > 1)", defined=lambda a: a >= 1,
                 differentiable=lambda a: a > 1),
    _elementwise("atanh", 1, sympy.atanh, torch.atanh, domain="-1 < x < 1", defined=lambda a: abs(a) < 1),
    _elementwise("sigmoid", 1, functions.sigmoid, torch.sigmoid, stable=True, fused=FUSED, saves_result=True,
                 kernel_error={"value": KernelError(roundings=2), "backward": ONE_MORE_STORE,
                               "forward": ONE_MORE_STORE}),
    # Its backward reads exp(-|x|), a buffer its forward saved in the stored dtype.
    _elementwise("logsigmoid", 1, functions.logsigmoid, F.logsigmoid, stable=True, fused=FUSED,
                 kernel_error={"backward": KernelError(stored_roundings=1), "forward": KernelError(stored_roundings=1)}),
    _elementwise("softplus", 1,
                 lambda a: sympy.Piecewise((a, a > SOFTPLUS_THRESHOLD), (functions.softplus(a), True)),
                 F.softplus, kink=f"x above {SOFTPLUS_THRESHOLD} gives x exactly (torch's threshold)", stable=True,
                 fused=FUSED),
    _elementwise("relu", 1, lambda a: sympy.Piecewise((a, a > 0), (0, True)), torch.relu, kink="relu'(0) = 0", fused=FUSED),
    _elementwise("elu", 1, lambda a: sympy.Piecewise((a, a > 0), (sympy.exp(a) - 1, True)), F.elu,
                 kink="elu'(0) = 1 (alpha = 1: no kink)", fused=FUSED),
    # Its vectorized float32 kernels (the half types' too) use an erf 1.5e-7 off, absolutely: up
    # to 7.3 roundings of gelu. Its float64 kernels are within its formula's model.
    _elementwise("gelu", 1, lambda a: a / 2 * (1 + sympy.erf(a / sympy.sqrt(2))), F.gelu, stable=True, fused=FUSED,
                 kernel_error=dict.fromkeys(("value", "backward", "forward"),
                                            KernelError(roundings=12, dtypes=(torch.float32, *HALF_TYPES)))),
    _elementwise("silu", 1, lambda a: a * functions.sigmoid(a), F.silu, stable=True, fused=FUSED_BACKWARD,
                 kernel_error={"forward": ONE_MORE_STORE}),
    _elementwise("mish", 1, lambda a: a * sympy.tanh(functions.softplus(a)), F.mish, stable=True, fused=FUSED_BACKWARD),
    # In the half types torch's erf is that vectorized float32 erf: 2.1e-7 off at 1.8e-7.
    _elementwise("erf", 1, sympy.erf, torch.erf, stable=True,
                 kernel_error={"value": KernelError(absolute=dict.fromkeys(HALF_TYPES, 3e-7))}),
    _elementwise("erfc", 1, sympy.erfc, torch.erfc, stable=True),
    _elementwise("lgamma", 1, lambda a: _defined(sympy.loggamma(a), a > 0), torch.lgamma, domain="x > 0",
                 defined=_positive),
    _elementwise("digamma", 1, lambda a: _defined(sympy.polygamma(0, a), a > 0), torch.digamma, domain="x > 0",
                 defined=_positive),
    _elementwise("sinc", 1, _sinc, torch.sinc, kink="sinc(0) = 1, derivatives at 0 are the limits"),
    # In the half types its log is rounded to the dtype before the product: 1.9 roundings.
    _elementwise("xlogy", 2, lambda a, b: _defined(a * sympy.log(b), b > 0), torch.xlogy, domain="y > 0",
                 kink="xlogy(0, y) = 0; ∂/∂x = log(y), also at x = 0", defined=lambda a, b: b > 0,
                 kernel_error={"value": KernelError(stored_roundings=1)}),
    # On the branch cut (y = 0, x < 0) torch follows IEEE: y = -0 gives -pi. The math has no
    # signed zero, and the exact pass none either, so -0 there is rejected, not judged.
    _elementwise("atan2", 2, sympy.atan2, torch.atan2, domain="(y, x) != (0, 0), and not y = -0 with x < 0",
                 defined=lambda a, b: ((a != 0) | (b != 0)) & ~((a == 0) & np.signbit(a) & (b < 0)), stable=True),
    _elementwise("hypot", 2, lambda a, b: sympy.sqrt(a**2 + b**2), torch.hypot, saves_result=True,
                 domain="all reals (derivative: (a, b) != (0, 0))", stable=True,
                 kernel_error={"backward": ONE_MORE_STORE},
                 differentiable=lambda a, b: (a != 0) | (b != 0)),
    _elementwise("maximum", 2, sympy.Max, torch.maximum, kink="ties split the gradient 1/2 each"),
    _elementwise("minimum", 2, sympy.Min, torch.minimum, kink="ties split the gradient 1/2 each"),
    _elementwise("where", 3, functions.select, torch.where, smooth_operands=(1, 2),
                 kink="the gradient flows only into the branch taken; 0 into the other"),
    _elementwise("round", 1, functions.round_half_even, torch.round,
                 kink="halves round to even; derivative 0 everywhere, jumps included"),
    _elementwise("floor", 1, functions.floor_real, torch.floor, kink="derivative 0 everywhere, jumps included"),
    _elementwise("ceil", 1, functions.ceil_real, torch.ceil, kink="derivative 0 everywhere, jumps included"),
    _elementwise("trunc", 1, functions.trunc_real, torch.trunc, kink="derivative 0 everywhere, jumps included"),
    # At lo == hi torch's forward mode and its backward disagree on where the derivative goes.
    _elementwise("clamp", 3, _clamp, torch.clamp, domain="all reals (derivative: lo != hi)",
                 differentiable=lambda x, low, high: low != high,
                 kink="∂/∂x is 1 on lo <= x <= hi, bounds included; lo > hi gives hi"),
]

COMPARISONS = [
    _elementwise(name, 2, relation, torch_form, result="boolean")
    for name, relation, torch_form in [
        ("less", sympy.Lt, torch.lt), ("less_equal", sympy.Le, torch.le), ("greater", sympy.Gt, torch.gt),
        ("greater_equal", sympy.Ge, torch.ge), ("equal", sympy.Eq, torch.eq), ("not_equal", sympy.Ne, torch.ne),
    ]
]
COMPARISONS += [
    _elementwise("logical_and", 2, sympy.And, torch.logical_and, result="boolean"),
    _elementwise("logical_or", 2, sympy.Or, torch.logical_or, result="boolean"),
    _elementwise("logical_not", 1, sympy.Not, torch.logical_not, result="boolean"),
]
COMPARISON_OPERATORS = {ast.Lt: "less", ast.LtE: "less_equal", ast.Gt: "greater", ast.GtE: "greater_equal",
                        ast.Eq: "equal", ast.NotEq: "not_equal"}
BOOLEAN_OPERATORS = {ast.And: "logical_and", ast.Or: "logical_or", ast.Not: "logical_not"}
CONDITIONS = {op.name for op in COMPARISONS}  # the condition of where, and nothing else

# -- reductions ------------------------------------------------------------------------


def _reduction(name, sympy_form, torch_form, kink="", params=(), domain="all reals", stable=False, fused=("value",),
               saves_result=False, shifts_exponentials=False, kernel_error=None):
    return Op(name, "reduction", 1, sympy_form, torch_form, _reduction_shape, domain, kink,
              params=("axis", "keepdims", *params), stable=stable, fused=fused, saves_result=saves_result,
              shifts_exponentials=shifts_exponentials, kernel_error=kernel_error or {})


def _prod_torch(t, dims, keepdim):
    # torch.prod reduces one dim at a time.
    for dim in sorted(dims, reverse=True):
        t = torch.prod(t, dim=dim, keepdim=keepdim)
    return t


def _variance(over):
    mean = over.sum(lambda v: v) / over.count
    return over.sum(lambda v: (v - mean) ** 2) / (over.count - 1)


def _norm(over, p=2):
    if p == 1:
        return over.sum(sympy.Abs)
    if p == 2:
        return sympy.sqrt(over.sum(lambda v: v**2))
    return over.max(sympy.Abs)


NORM_ORDERS = (1, 2, math.inf)

REDUCTIONS = [
    _reduction("sum", lambda over: over.sum(lambda v: v), torch.sum),
    _reduction("mean", lambda over: over.sum(lambda v: v) / over.count, torch.mean),
    _reduction("prod", lambda over: over.product(lambda v: v), _prod_torch, fused=(), saves_result=True),
    _reduction("amax", lambda over: over.max(lambda v: v), torch.amax, kink="tied maxima share the gradient evenly"),
    _reduction("amin", lambda over: over.min(lambda v: v), torch.amin, kink="tied minima share the gradient evenly"),
    _reduction("logsumexp", lambda over: sympy.log(over.sum(sympy.exp)), torch.logsumexp, stable=True,
               saves_result=True, shifts_exponentials=True, kernel_error={"value": ROUNDED_SUM_STORED}),
    _reduction("var", _variance, lambda t, dims, keepdim: torch.var(t, dim=dims, keepdim=keepdim),
               domain="two or more elements (unbiased)"),
    _reduction("std", lambda over: sympy.sqrt(_variance(over)),
               lambda t, dims, keepdim: torch.std(t, dim=dims, keepdim=keepdim),
               domain="two or more elements, not all equal (derivative)", saves_result=True),
    _reduction("norm", _norm,
               lambda t, dims, keepdim, p=2: torch.linalg.vector_norm(t, ord=p, dim=dims, keepdim=keepdim),
               kink="the gradient at 0 is 0; p = inf: tied maxima share it evenly", params=("p",), saves_result=True),
]

# -- along one axis --------------------------------------------------------------------


CUMPROD_MAX_SIZE = 16


def _axiswise(name, sympy_form, torch_form, backward_condition=None, stable=False, fused=("value",),
              saves_result=False, saved_exp=None, shifts_exponentials=False, kernel_error=None, max_size=None):
    return Op(name, "axiswise", 1, sympy_form, torch_form, _axiswise_shape, params=("axis",),
              backward_condition=backward_condition, stable=stable, fused=fused, saves_result=saves_result,
              saved_exp=saved_exp, shifts_exponentials=shifts_exponentials, kernel_error=kernel_error or {},
              max_size=max_size)


AXISWISE = [
    _axiswise("cumsum", lambda along: along.sum(lambda v: v, upto_here=True), lambda t, d: torch.cumsum(t, d),
              fused=FUSED),
    # Its backward's formula holds a product per pair of positions in a row: the exact pass
    # costs the row's length cubed (23 s a point at 60, 0.1 s at 8; a float16 check took 19 min).
    _axiswise("cumprod", lambda along: along.product(lambda v: v, upto_here=True), lambda t, d: torch.cumprod(t, d),
              fused=(), saves_result=True, kernel_error={"value": ONE_MORE_STORE}, max_size=CUMPROD_MAX_SIZE),
    _axiswise("logcumsumexp", lambda along: sympy.log(along.sum(sympy.exp, upto_here=True)),
              lambda t, d: torch.logcumsumexp(t, d), stable=True,
              saves_result=True),
    _axiswise("softmax", lambda along: sympy.exp(along.here) / along.sum(sympy.exp), lambda t, d: torch.softmax(t, d),
              stable=True, fused=FUSED_BACKWARD, saves_result=True, saved_exp=lambda y, total: y * total,
              shifts_exponentials=True,
              # Its JVP is torch's logsumexp_jvp, separate ops: the shift x - max is stored (a
              # bfloat16 softmax JVP at [9.8125, -10] is 6.5% off, from the shift 19.8125 stored as 19.75).
              kernel_error={"forward": KernelError(stored_log_roundings=True)}),
    _axiswise("log_softmax", lambda along: along.here - sympy.log(along.sum(sympy.exp)),
              lambda t, d: torch.log_softmax(t, d), stable=True, fused=FUSED_BACKWARD, saves_result=True,
              saved_exp=lambda y, total: sympy.exp(y) * total, shifts_exponentials=True,
              kernel_error={"value": ROUNDED_SUM_STORED, "backward": ONE_MORE_STORE}),
]

# -- structure: products, transposes, reshapes, joins ----------------------------------


def _matmul_shape(shapes, params):
    """numpy's @: vectors and matrices, and stacks of matrices whose batch dims broadcast."""
    a, b = shapes
    if not a or not b:
        raise ShapeError("@ takes operands of rank 1 or more")
    inner_a, inner_b = a[-1], (b[0] if len(b) == 1 else b[-2])
    if inner_a != inner_b:
        raise ShapeError(f"@ needs matching inner sizes, got {_show(a)} @ {_show(b)} ({inner_a} != {inner_b})")
    batch = broadcast_shapes(a[:-2], b[:-2])
    return tuple(batch) + tuple(a[-2:-1]) + tuple(b[-1:] if len(b) > 1 else ())


def _matmul_sympy(element, index, shapes, fresh_index, params):
    a, b = shapes
    batch_rank = len(index) - (len(a) > 1) - (len(b) > 1)
    batch, rest = tuple(index[:batch_rank]), list(index[batch_rank:])
    row = (rest.pop(0),) if len(a) > 1 else ()
    column = (rest.pop(0),) if len(b) > 1 else ()
    k, limits = fresh_index(a[-1])
    left = _batch_index(batch, a[:-2]) + row + (k,)
    right = _batch_index(batch, b[:-2]) + (k,) + column
    return sympy.Sum(element(0, left) * element(1, right), limits)


def _batch_index(batch: tuple, dims: tuple) -> tuple:
    """An operand's share of the output's batch index: aligned right, 0 where it broadcasts."""
    own = batch[len(batch) - len(dims):] if dims else ()
    return tuple(sympy.Integer(0) if d == 1 else i for i, d in zip(own, dims))


def _matmul_torch(tensors, params):
    a, b = tensors
    # Every operand carries a leading batch dim (the points): make both stacks of matrices of
    # one rank, so that torch broadcasts the spec's batch dims and never the points' dim.
    a = a.unsqueeze(-2) if a.dim() == 2 else a
    b = b.unsqueeze(-1) if b.dim() == 2 else b
    rank = max(a.dim(), b.dim())
    a = a.reshape(a.shape[:1] + (1,) * (rank - a.dim()) + a.shape[1:])
    b = b.reshape(b.shape[:1] + (1,) * (rank - b.dim()) + b.shape[1:])
    product = torch.matmul(a, b)
    if tensors[0].dim() == 2:
        product = product.squeeze(-2)
    if tensors[1].dim() == 2:
        product = product.squeeze(-1)
    return product


def _dot_shape(shapes, params):
    if any(len(s) != 1 for s in shapes) or shapes[0] != shapes[1]:
        raise ShapeError(f"dot takes two vectors of one size, got {_show(shapes[0])} and {_show(shapes[1])}")
    return ()


def _outer_shape(shapes, params):
    if any(len(s) != 1 for s in shapes):
        raise ShapeError(f"outer takes two vectors, got {_show(shapes[0])} and {_show(shapes[1])}")
    return (shapes[0][0], shapes[1][0])


def _square_shape(what):
    def rule(shapes, params):
        (shape,) = shapes
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ShapeError(f"{what} needs a square matrix, got {_show(shape)}")
        return () if what in ("trace", "det") else shape
    return rule


def _transpose_shape(shapes, params):
    (shape,) = shapes
    if len(shape) != 2:
        raise ShapeError(f".T needs a matrix, got an operand of rank {len(shape)}")
    return (shape[1], shape[0])


def _permutation(params, rank: int) -> tuple:
    """The operand axis of each output axis: permute's ``axes``, or swapaxes's two swapped."""
    if "axes" in params:
        axes = params["axes"] if isinstance(params["axes"], tuple) else (params["axes"],)
        order = tuple(normalize_axes(a, rank)[0] for a in axes)
        if sorted(order) != list(range(rank)):
            raise ShapeError(f"permute takes an order of all {rank} axes, got {params['axes']}")
        return order
    first, second = (normalize_axes(params[key], rank)[0] for key in ("axis1", "axis2"))
    order = list(range(rank))
    order[first], order[second] = second, first
    return tuple(order)


def _permute_shape(shapes, params):
    (shape,) = shapes
    return tuple(shape[a] for a in _permutation(params, len(shape)))


def _permute_sympy(element, index, shapes, fresh_index, params):
    order = _permutation(params, len(shapes[0]))
    operand_index = [None] * len(order)
    for position, axis in enumerate(order):
        operand_index[axis] = index[position]
    return element(0, tuple(operand_index))


def _permute_torch(tensors, params):
    (t,) = tensors
    return t.permute(0, *(a + 1 for a in _permutation(params, t.dim() - 1)))


def _einsum_sizes(shapes, params) -> dict:
    terms, _ = params["subscripts"]
    if len(terms) != len(shapes):
        raise ShapeError(f"einsum's subscripts name {len(terms)} operand(s), and {len(shapes)} are given")
    sizes = {}
    for term, shape in zip(terms, shapes):
        if len(term) != len(shape):
            raise ShapeError(f"einsum's subscript {term!r} has {len(term)} letters for an operand of shape "
                             f"{_show(shape)}")
        for letter, dim in zip(term, shape):
            if sizes.setdefault(letter, dim) != dim:
                raise ShapeError(f"einsum's {letter} is {sizes[letter]} in one operand and {dim} in another")
    return sizes


def _einsum_shape(shapes, params):
    sizes = _einsum_sizes(shapes, params)
    return tuple(sizes[letter] for letter in params["subscripts"][1])


def _einsum_sympy(element, index, shapes, fresh_index, params):
    terms, output = params["subscripts"]
    sizes = _einsum_sizes(shapes, params)
    at = dict(zip(output, index))
    limits = []
    for letter in sorted(set("".join(terms)) - set(output)):
        at[letter], limit = fresh_index(sizes[letter])
        limits.append(limit)
    product = sympy.Mul(*(element(k, tuple(at[c] for c in term)) for k, term in enumerate(terms)))
    return sympy.Sum(product, *limits) if limits else product


def _einsum_torch(tensors, params):
    terms, output = params["subscripts"]
    points = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in "".join(terms))
    return torch.einsum(",".join(points + term for term in terms) + "->" + points + output, *tensors)


def _per_axis(params, key: str, spatial: int, default: int) -> tuple:
    value = params.get(key, default)
    values = value if isinstance(value, tuple) else (value,) * spatial
    if len(values) != spatial or not all(isinstance(v, int) for v in values):
        raise ShapeError(f"{key} is an integer or a tuple of {spatial}")
    if any(v < (0 if key == "padding" else 1) for v in values):
        raise ShapeError(f"{key} must be {'0 or more' if key == 'padding' else '1 or more'}, got {value}")
    return values


def _conv_geometry(params, spatial: int) -> tuple:
    return tuple(_per_axis(params, key, spatial, default)
                 for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)))


def _conv_shape(spatial: int):
    def rule(shapes, params):
        x, w = shapes
        if len(x) != spatial + 2 or len(w) != spatial + 2:
            raise ShapeError(f"conv{spatial}d takes x [batch, channels, {spatial} spatial dim(s)] and w [out, in, "
                             f"{spatial} kernel dim(s)], got {_show(x)} and {_show(w)}")
        groups = params.get("groups", 1)
        if not isinstance(groups, int) or groups < 1:
            raise ShapeError(f"groups is a positive integer, got {groups}")
        if sympy.expand(x[1] - w[1] * groups) != 0:
            raise ShapeError(f"conv{spatial}d needs x's channels ({x[1]}) to be w's input channels ({w[1]}) times "
                             f"groups ({groups})")
        if groups > 1 and not (isinstance(w[0], int) and w[0] % groups == 0):
            raise ShapeError(f"conv{spatial}d with groups={groups} needs w's output channels ({w[0]}) to be a "
                             "constant multiple of the groups")
        stride, padding, dilation = _conv_geometry(params, spatial)
        out = []
        for size, kernel, s, p, d in zip(x[2:], w[2:], stride, padding, dilation):
            reach = size + 2 * p - d * (kernel - 1) - 1
            length = reach + 1 if s == 1 else sympy.floor(sympy.Integer(reach) / s if isinstance(reach, int)
                                                            else reach / s) + 1
            length = int(length) if isinstance(length, (int, sympy.Integer)) else length
            if isinstance(length, int) and length < 1:
                raise ShapeError(f"conv{spatial}d's kernel ({kernel}) does not fit in {size} (padding {p}, dilation {d})")
            out.append(length)
        return (x[0], w[0], *out)
    return rule


def _conv_sympy(spatial: int):
    def form(element, index, shapes, fresh_index, params):
        x, w = shapes
        stride, padding, dilation = _conv_geometry(params, spatial)
        channel, channel_limit = fresh_index(w[1])
        groups = params.get("groups", 1)
        # Output channel o belongs to group o // (out / groups), which reads input channels from there on.
        first = sympy.floor(index[1] / (w[0] // groups)) * w[1] if groups > 1 else 0
        limits, offsets, inside = [channel_limit], [], sympy.true
        for kernel in w[2:]:
            offset, limit = fresh_index(kernel)
            offsets.append(offset)
            limits.append(limit)
        positions = []
        for out, offset, size, s, p, d in zip(index[2:], offsets, x[2:], stride, padding, dilation):
            position = out * s + offset * d - p
            positions.append(position)
            if p:
                inside = inside & (position >= 0) & (position <= size - 1)
        taken = element(0, (index[0], first + channel, *positions))
        if inside is not sympy.true:  # zero padding
            taken = functions.select(inside, taken, sympy.Integer(0))
        return sympy.Sum(taken * element(1, (index[1], channel, *offsets)), *reversed(limits))
    return form


def _conv_torch(spatial: int):
    convolve = F.conv1d if spatial == 1 else F.conv2d

    def form(tensors, params):
        x, w = tensors
        points = x.shape[0]
        stride, padding, dilation = _conv_geometry(params, spatial)
        # Each point has its own weights: the points become groups of one convolution.
        merged = x.transpose(0, 1).reshape(x.shape[1], points * x.shape[2], *x.shape[3:])
        out = convolve(merged, w.reshape(points * w.shape[1], *w.shape[2:]), stride=stride, padding=padding,
                       dilation=dilation, groups=points * params.get("groups", 1))
        return out.reshape(out.shape[0], points, w.shape[1], *out.shape[2:]).transpose(0, 1)
    return form


def _pool_geometry(params, spatial: int) -> tuple:
    if "kernel" not in params:
        raise ShapeError("pooling needs kernel=")
    kernel = _per_axis(params, "kernel", spatial, 1)
    return kernel, _per_axis(params, "stride", spatial, 1) if "stride" in params else kernel


def _pool_shape(spatial: int):
    def rule(shapes, params):
        (x,) = shapes
        if len(x) < spatial + 1:
            raise ShapeError(f"pooling over {spatial} dim(s) takes [channels, {spatial} spatial dim(s)] or more, "
                             f"got {_show(x)}")
        kernel, stride = _pool_geometry(params, spatial)
        out = []
        for size, k, s in zip(x[-spatial:], kernel, stride):
            reach = size - k
            length = reach // s + 1 if isinstance(reach, int) else (
                reach + 1 if s == 1 else sympy.floor(reach / s) + 1)
            if isinstance(length, int) and length < 1:
                raise ShapeError(f"the pooling window ({k}) does not fit in {size}")
            out.append(length)
        return tuple(x[:-spatial]) + tuple(out)
    return rule


def _pool_sympy(spatial: int, largest: bool):
    def form(element, index, shapes, fresh_index, params):
        kernel, stride = _pool_geometry(params, spatial)
        offsets, limits = [], []
        for k in kernel:
            offset, limit = fresh_index(k)
            offsets.append(offset)
            limits.append(limit)
        lead = tuple(index[:-spatial])

        def at(window):
            return element(0, lead + tuple(o * s + w for o, s, w in zip(index[-spatial:], stride, window)))

        taken = at(offsets)
        if not largest:
            return sympy.Sum(taken, *limits) / math.prod(kernel)
        # The first maximum of the window (in row-major order) takes the value and the gradient, as torch's.
        others = [fresh_index(k) for k in kernel]
        flat = sum((o * math.prod(kernel[a + 1:]) for a, o in enumerate(offsets)), sympy.Integer(0))
        other_flat = sum((o * math.prod(kernel[a + 1:]) for a, (o, _) in enumerate(others)), sympy.Integer(0))
        rank = sympy.Sum(functions.precedes(at([o for o, _ in others]), taken, other_flat, flat, sympy.Integer(1)),
                         *(limit for _, limit in others))
        return sympy.Sum(taken * sympy.KroneckerDelta(rank, 0), *limits)
    return form


def _pool_torch(spatial: int, largest: bool):
    pool = {(1, True): F.max_pool1d, (1, False): F.avg_pool1d, (2, True): F.max_pool2d, (2, False): F.avg_pool2d}[
        spatial, largest]

    def form(tensors, params):
        (x,) = tensors
        kernel, stride = _pool_geometry(params, spatial)
        flat = x.reshape(-1, 1, *x.shape[-spatial:])  # every leading dim, points included, as channels
        out = pool(flat, kernel, stride)
        return out.reshape(*x.shape[:-spatial], *out.shape[-spatial:])
    return form


def _diag_shape(shapes, params):
    (shape,) = shapes
    if len(shape) == 1:
        return (shape[0], shape[0])
    if len(shape) == 2 and shape[0] == shape[1]:
        return (shape[0],)
    raise ShapeError(f"diag takes a vector or a square matrix, got {_show(shape)}")


def _diag_sympy(element, index, shapes, fresh_index, params):
    if len(shapes[0]) == 2:
        return element(0, (index[0], index[0]))
    return sympy.KroneckerDelta(index[0], index[1]) * element(0, (index[0],))


def _diag_torch(tensors, params):
    (t,) = tensors
    if t.dim() == 2:
        return torch.diag_embed(t)
    return torch.diagonal(t, dim1=1, dim2=2)


def _size_product(dims):
    total = sympy.Integer(1)
    for d in dims:
        total *= d
    return total


def _reshape_shape(shapes, params):
    (shape,) = shapes
    target = params.get("shape")
    if target is None:
        raise ShapeError("reshape needs shape=(...)")
    target = target if isinstance(target, tuple) else (target,)
    if sum(1 for d in target if d == -1) > 1:
        raise ShapeError("reshape takes at most one -1")
    total = _size_product(shape)
    known = _size_product([d for d in target if d != -1])
    if -1 in target:
        rest = sympy.cancel(total / known)
        if not (rest.is_integer or (sympy.denom(rest) == 1)):
            raise ShapeError(f"cannot reshape {_show(shape)} into {target}: the sizes do not divide")
        target = tuple(rest if d == -1 else d for d in target)
    if sympy.expand(_size_product(target) - total) != 0:
        raise ShapeError(f"cannot reshape {_show(shape)} ({total} elements) into {_show(target)}")
    return tuple(int(d) if isinstance(d, (int, sympy.Integer)) else d for d in target)


def _row_major(index, dims):
    flat = sympy.Integer(0)
    for i, d in zip(index, dims):
        flat = flat * d + i
    return flat


def _unravel(flat, dims):
    index = []
    for d in reversed(dims[1:]):
        index.append(sympy.Mod(flat, d))
        flat = sympy.floor(flat / d)
    index.append(flat)
    return tuple(reversed(index))


def _reshape_sympy(element, index, shapes, fresh_index, params):
    (shape,) = shapes
    return element(0, _unravel(_row_major(index, params["shape"]), shape))


def _reshape_torch(tensors, params):
    (t,) = tensors
    return t.reshape((t.shape[0], *params["shape"]))


def join_axis(params, rank: int, stack: bool) -> int:
    """The normalized axis of concat (rank of the operands) or stack (one more)."""
    return normalize_axes(params.get("axis", 0), rank + 1 if stack else rank)[0]


def _join_shape(stack):
    def rule(shapes, params):
        first = shapes[0]
        if stack:
            if any(s != first for s in shapes):
                raise ShapeError(f"stack takes operands of one shape, got {', '.join(map(_show, shapes))}")
            axis = join_axis(params, len(first), stack=True)
            return first[:axis] + (len(shapes),) + first[axis:]
        if not first:
            raise ShapeError("concat takes operands of rank 1 or more")
        axis = join_axis(params, len(first), stack=False)
        for s in shapes:
            if len(s) != len(first) or any(a != b for k, (a, b) in enumerate(zip(s, first)) if k != axis):
                raise ShapeError(f"concat along axis {axis} needs the other sizes to match, got "
                                 f"{', '.join(map(_show, shapes))}")
        return first[:axis] + (sum((s[axis] for s in shapes), sympy.Integer(0)),) + first[axis + 1:]
    return rule


def _concat_sympy(element, index, shapes, fresh_index, params):
    axis = join_axis(params, len(shapes[0]), stack=False)
    pieces, offset = [], sympy.Integer(0)
    for position, shape in enumerate(shapes):
        shifted = tuple(i - offset if k == axis else i for k, i in enumerate(index))
        pieces.append((element(position, shifted), index[axis] < offset + shape[axis]))
        offset += shape[axis]
    return sympy.Piecewise(*pieces[:-1], (pieces[-1][0], True))


def _stack_sympy(element, index, shapes, fresh_index, params):
    axis = join_axis(params, len(shapes[0]), stack=True)
    inner = tuple(i for k, i in enumerate(index) if k != axis)
    pieces = [(element(position, inner), sympy.Eq(index[axis], position)) for position in range(len(shapes))]
    return sympy.Piecewise(*pieces[:-1], (pieces[-1][0], True))


def _as_expr(value):
    return sympy.Integer(value) if isinstance(value, int) else value


def _slice_start_stop(item, dim):
    """Bounds of a slice ``(start, stop, step)`` of a dim: each bound None, an int (negative
    ones count from the end) or an expression in the size symbols (n - 1)."""
    start, stop = item[:2]
    start = 0 if start is None else (dim + start if isinstance(start, int) and start < 0 else start)
    stop = dim if stop is None else (dim + stop if isinstance(stop, int) and stop < 0 else stop)
    return _as_expr(start), _as_expr(stop)


def _slice_step(item) -> int:
    return item[2] if len(item) > 2 else 1


def _slice_length(item, dim):
    start, stop = _slice_start_stop(item, dim)
    step = _slice_step(item)
    span = sympy.expand(stop - start)
    length = span if step == 1 else sympy.floor((span + step - 1) / step)
    return int(length) if length.is_number else length


def _slice_shape(shapes, params):
    (shape,) = shapes
    items = params["items"]
    if len(items) > len(shape):
        raise ShapeError(f"too many indices ({len(items)}) for an operand of rank {len(shape)}")
    out = []
    for dim, item in zip(shape, items):
        if isinstance(item, int):
            if isinstance(dim, int) and not -dim <= item < dim:
                raise ShapeError(f"index {item} is out of range for a dim of size {dim}")
            continue
        if _slice_step(item) < 1:
            raise ShapeError("a slice's step is a positive integer")
        length = _slice_length(item, dim)
        if isinstance(length, int) and length < 1:
            raise ShapeError(f"the slice is empty for a dim of size {dim}")
        out.append(length)
    return tuple(out) + tuple(shape[len(items):])


def slice_requirements(shape, items) -> list:
    """Expressions in the size symbols that must be at least 1 for the slice to be valid."""
    needs = []
    for dim, item in zip(shape, items):
        if isinstance(item, int):
            needs.append(_as_expr(dim) - item if item >= 0 else _as_expr(dim) + item + 1)
        else:
            start, stop = _slice_start_stop(item, dim)
            needs.extend([start + 1, _as_expr(dim) - stop + 1, stop - start])
    return needs


def concrete_items(items, sizes: dict) -> tuple:
    """A slice's items with every size symbol given its value (name -> int)."""
    def concrete(bound):
        return bound if bound is None or isinstance(bound, int) else concrete_dim(bound, sizes)
    return tuple(item if isinstance(item, int) else tuple(concrete(b) for b in item) for item in items)


def _slice_sympy(element, index, shapes, fresh_index, params):
    (shape,) = shapes
    positions = iter(index)
    operand_index = []
    for dim, item in zip(shape, params["items"]):
        if isinstance(item, int):
            operand_index.append(_as_expr(item) if item >= 0 else _as_expr(dim) + item)
        else:
            operand_index.append(next(positions) * _slice_step(item) + _slice_start_stop(item, dim)[0])
    operand_index.extend(positions)
    return element(0, tuple(operand_index))


def _slice_torch(tensors, params):
    (t,) = tensors
    key = (slice(None),) + tuple(i if isinstance(i, int) else slice(*i) for i in params["items"])
    return t[key]


def _matrix_of(element, size):
    return sympy.Matrix(size, size, lambda r, c: element(0, (sympy.Integer(r), sympy.Integer(c))))


def _det_sympy(element, index, shapes, fresh_index, params):
    size = shapes[0][0]
    if not isinstance(size, int):
        raise ShapeError("det needs concrete sizes")
    return _matrix_of(element, size).det(method="berkowitz")


def _inv_sympy(element, index, shapes, fresh_index, params):
    size = shapes[0][0]
    if not isinstance(size, int):
        raise ShapeError("inv needs concrete sizes")
    # The adjugate over the determinant is defined wherever A is invertible; elimination
    # would divide by A[0, 0] and leave [[0, 1], [1, 0]] undefined.
    matrix = _matrix_of(element, size)
    inverse = matrix.adjugate(method="berkowitz") / matrix.det(method="berkowitz")
    # One formula for every element: select the entry at the (symbolic) index.
    pieces = [(inverse[r, c], sympy.Eq(index[0], r) & sympy.Eq(index[1], c)) for r in range(size) for c in range(size)]
    return sympy.Piecewise(*pieces[:-1], (pieces[-1][0], True))


def _structural(name, arity, sympy_form, torch_form, infer_shape, params=(), domain="all reals", max_size=None,
                defined=None, backward_condition=None, forward_condition=None, kink="", differentiable=None,
                integer_operands=(), positional_params=(), result="real", min_operands=2, fused=("value",), ties="",
                unfused_in=None):
    return Op(name, "structural", arity, sympy_form, torch_form, infer_shape, domain, kink=kink, params=params,
              min_operands=min_operands, ties=ties,
              max_size=max_size, defined=defined, backward_condition=backward_condition,
              forward_condition=forward_condition, differentiable=differentiable,
              integer_operands=integer_operands, positional_params=positional_params, result=result, fused=fused,
              unfused_in=unfused_in or {})


# -- indices: gathers by integer operands, sorting, and the positions of extrema -----------


def _take_shape(shapes, params):
    x, t = shapes
    if not x:
        raise ShapeError("take needs an operand of rank 1 or more")
    axis = normalize_axes(params.get("axis", -1), len(x))[0]
    others = x[:axis] + x[axis + 1:]
    if len(t) == len(x) - 1 and tuple(t) == others:
        return tuple(t)
    if len(t) == len(x) and all(a == b for k, (a, b) in enumerate(zip(t, x)) if k != axis):
        return tuple(t)
    raise ShapeError(f"take's indices have shape {_show(t)}: along axis {axis} of {_show(x)} they need "
                     f"{_show(others)} (one per row), or {_show(x[:axis] + ('k',) + x[axis + 1:])} (gather)")


def _take_sympy(element, index, shapes, fresh_index, params):
    x, t = shapes
    axis = normalize_axes(params.get("axis", -1), len(x))[0]
    position = element(1, tuple(index))
    rest = index[axis:] if len(t) < len(x) else index[axis + 1:]
    return element(0, tuple(index[:axis]) + (position,) + tuple(rest))


def _take_torch(tensors, params):
    x, t = tensors
    axis = normalize_axes(params.get("axis", -1), x.dim() - 1)[0] + 1
    if t.dim() < x.dim():
        return torch.gather(x, axis, t.unsqueeze(axis)).squeeze(axis)
    return torch.gather(x, axis, t)


def _one_hot_shape(shapes, params):
    if "classes" not in params:
        raise ShapeError("one_hot needs the number of classes: one_hot(t, c)")
    return tuple(shapes[0]) + (params["classes"],)


def _one_hot_sympy(element, index, shapes, fresh_index, params):
    return sympy.KroneckerDelta(element(0, tuple(index[:-1])), index[-1])


def _index_shape(shapes, params):
    x, t = shapes
    if not x:
        raise ShapeError("indexing by integers needs an operand of rank 1 or more")
    return tuple(t) + tuple(x[1:])


def _index_sympy(element, index, shapes, fresh_index, params):
    rank = len(shapes[1])
    return element(0, (element(1, tuple(index[:rank])),) + tuple(index[rank:]))


def _index_torch(tensors, params):
    x, t = tensors
    rows = torch.arange(x.shape[0], device=x.device).reshape((-1,) + (1,) * (t.dim() - 1))
    return x[rows, t]


def _sorted_shape(shapes, params):
    (shape,) = shapes
    axis = single_axis(params, len(shape))
    k = params.get("k")
    if k is None:
        return shape
    if isinstance(k, int) and k < 1:
        raise ShapeError(f"topk takes k >= 1, got {k}")
    if isinstance(k, int) and isinstance(shape[axis], int) and k > shape[axis]:
        raise ShapeError(f"topk takes k <= {shape[axis]}, the size of axis {axis}; got {k}")
    return shape[:axis] + (k,) + shape[axis + 1:]


def _rank(at, j, size, fresh_index, descending: bool):
    """How many elements a stable sort puts before element j along its axis."""
    m, limits = fresh_index(size)
    return sympy.Sum(functions.precedes(at(m), at(j), m, j, sympy.Integer(int(descending))), limits)


def _sorted_sympy(element, index, shapes, fresh_index, params):
    (shape,) = shapes
    axis = single_axis(params, len(shape))
    descending = params.get("descending", False) or "k" in params

    def at(position):
        return element(0, tuple(position if a == axis else i for a, i in enumerate(index)))

    j, limits = fresh_index(shape[axis])
    # Element k of the sorted axis is the one whose rank is k: the gradient scatters back through it.
    return sympy.Sum(at(j) * sympy.KroneckerDelta(_rank(at, j, shape[axis], fresh_index, descending), index[axis]),
                     limits)


def _sorted_torch(tensors, params):
    (t,) = tensors
    axis = single_axis(params, t.dim() - 1) + 1
    k = params.get("k")
    if k is None:
        return torch.sort(t, dim=axis, descending=params.get("descending", False), stable=True).values
    return torch.topk(t, k, dim=axis).values


def _arg_shape(shapes, params):
    (shape,) = shapes
    axis = single_axis(params, len(shape))
    return shape[:axis] + shape[axis + 1:]


def _arg_extremum(largest: bool):
    def form(element, index, shapes, fresh_index, params):
        (shape,) = shapes
        axis = single_axis(params, len(shape))

        def at(position):
            return element(0, tuple(index[:axis]) + (position,) + tuple(index[axis:]))

        # The position that a stable sort puts first: the first of tied extrema, as torch documents.
        k, limits = fresh_index(shape[axis])
        return sympy.Sum(k * sympy.KroneckerDelta(_rank(at, k, shape[axis], fresh_index, largest), 0), limits)
    return form


def _arg_torch(largest: bool):
    def form(tensors, params):
        (t,) = tensors
        axis = single_axis(params, t.dim() - 1) + 1
        return torch.argmax(t, dim=axis) if largest else torch.argmin(t, dim=axis)
    return form


MAX_CONDITION = 1e6


def _condition_number(matrix):
    with np.errstate(all="ignore"):
        return np.linalg.cond(matrix)


def _conditioned(matrix):
    return _condition_number(matrix) < MAX_CONDITION


# Sizes of det and inv are drawn up to this: their sympy forms grow factorially, and the
# derivation is done once per size.
CONCRETE_MAX_SIZE = 2

STRUCTURAL = [
    _structural("matmul", 2, _matmul_sympy, _matmul_torch, _matmul_shape, fused=FUSED_BACKWARD),
    _structural("transpose", 1, lambda element, index, shapes, fresh, params: element(0, (index[1], index[0])),
                lambda tensors, params: tensors[0].transpose(-1, -2), _transpose_shape),
    _structural("permute", 1, _permute_sympy, _permute_torch, _permute_shape, params=("axes",),
                positional_params=("axes",)),
    _structural("swapaxes", 1, _permute_sympy, _permute_torch, _permute_shape, params=("axis1", "axis2"),
                positional_params=("axis1", "axis2")),
    # torch lowers an einsum to bmm, or, by the shapes, to products and sums: its backward's
    # products may be stored before they are summed (bfloat16, ∂B of "bnk,bkm->bnm" at k = 1,
    # m = 1: 1.5 * -3.296875 is stored as -4.9375, and 0.3125 comes back for 0.3047).
    _structural("einsum", None, _einsum_sympy, _einsum_torch, _einsum_shape, min_operands=1, fused=("value",)),
    _structural("conv1d", 2, _conv_sympy(1), _conv_torch(1), _conv_shape(1),
                params=("stride", "padding", "dilation", "groups"), fused=FUSED_BACKWARD,
                unfused_in={"backward": HALF_TYPES}),
    _structural("conv2d", 2, _conv_sympy(2), _conv_torch(2), _conv_shape(2),
                params=("stride", "padding", "dilation", "groups"), fused=FUSED_BACKWARD,
                unfused_in={"backward": HALF_TYPES}),
    *(_structural(f"{kind}_pool{spatial}d", 1, _pool_sympy(spatial, kind == "max"), _pool_torch(spatial, kind == "max"),
                  _pool_shape(spatial), params=("kernel", "stride"),
                  kink="the first maximum of a window takes its gradient, as torch's" if kind == "max" else "",
                  fused=FUSED, unfused_in={"backward": HALF_TYPES})
      for kind in ("max", "avg") for spatial in (1, 2)),
    # torch.dot's kernel, as a matmul's: one accumulation (in float32 for the half types), not a
    # product per element stored in the dtype (float16's 98 * 930 overflows where the dot does not).
    _structural("dot", 2, _matmul_sympy, _matmul_torch, _dot_shape, fused=FUSED_BACKWARD),
    _structural("outer", 2, lambda element, index, shapes, fresh, params: element(0, index[:1]) * element(1, index[1:]),
                lambda tensors, params: tensors[0].unsqueeze(-1) * tensors[1].unsqueeze(-2), _outer_shape),
    _structural("trace", 1,
                lambda element, index, shapes, fresh, params: _trace(element, shapes, fresh),
                lambda tensors, params: torch.diagonal(tensors[0], dim1=1, dim2=2).sum(-1), _square_shape("trace")),
    _structural("diag", 1, _diag_sympy, _diag_torch, _diag_shape),
    _structural("reshape", 1, _reshape_sympy, _reshape_torch, _reshape_shape, params=("shape",)),
    _structural("concat", None, _concat_sympy,
                lambda tensors, params: torch.cat(tensors, dim=join_axis(params, tensors[0].dim() - 1, False) + 1),
                _join_shape(stack=False), params=("axis",)),
    _structural("stack", None, _stack_sympy,
                lambda tensors, params: torch.stack(tensors, dim=join_axis(params, tensors[0].dim() - 1, True) + 1),
                _join_shape(stack=True), params=("axis",)),
    _structural("slice", 1, _slice_sympy, _slice_torch, _slice_shape),
    _structural("take", 2, _take_sympy, _take_torch, _take_shape, params=("axis",), integer_operands=(1,),
                kink="the gradient scatters back to the taken positions (torch.gather)"),
    _structural("one_hot", 1, _one_hot_sympy, lambda tensors, params: F.one_hot(tensors[0], params["classes"]),
                _one_hot_shape, params=("classes",), integer_operands=(0,), positional_params=("classes",)),
    _structural("index", 2, _index_sympy, _index_torch, _index_shape, integer_operands=(1,),
                kink="the gradient scatters back to the rows taken, summed over repeats"),
    _structural("sort", 1, _sorted_sympy, _sorted_torch, _sorted_shape, params=("axis", "descending"), ties="stable",
                kink="the gradient scatters back through the permutation; tied elements may take any order"),
    _structural("topk", 1, _sorted_sympy, _sorted_torch, _sorted_shape, params=("k", "axis"),
                positional_params=("k",), domain="the k-th and (k+1)-th largest differ (derivative)", ties="any",
                kink="the k largest, largest first; tied elements may take any order"),
    _structural("argmax", 1, _arg_extremum(True), _arg_torch(True), _arg_shape, params=("axis",), result="integer",
                kink="an integer, the first position of the maximum; no gradient"),
    _structural("argmin", 1, _arg_extremum(False), _arg_torch(False), _arg_shape, params=("axis",), result="integer",
                kink="an integer, the first position of the minimum; no gradient"),
    # torch's det backward at an exactly singular matrix gives 0, not the adjugate, so both
    # stay away from singular and ill-conditioned matrices.
    _structural("det", 1, _det_sympy, lambda tensors, params: torch.linalg.det(tensors[0]), _square_shape("det"),
                domain=f"condition number below {MAX_CONDITION:g}", max_size=CONCRETE_MAX_SIZE, defined=_conditioned,
                backward_condition=lambda dtype, y, a: _condition_number(a),
                forward_condition=lambda dtype, y, a: _condition_number(a)),
    _structural("inv", 1, _inv_sympy, lambda tensors, params: torch.linalg.inv(tensors[0]), _square_shape("inv"),
                domain=f"condition number below {MAX_CONDITION:g}", max_size=CONCRETE_MAX_SIZE, defined=_conditioned,
                backward_condition=lambda dtype, y, a: _condition_number(a) ** 2,
                forward_condition=lambda dtype, y, a: _condition_number(a)),
]


def _trace(element, shapes, fresh_index):
    k, limits = fresh_index(shapes[0][0])
    return sympy.Sum(element(0, (k, k)), limits)


REGISTRY: dict[str, Op] = {op.name: op for op in [*ELEMENTWISE, *COMPARISONS, *REDUCTIONS, *AXISWISE, *STRUCTURAL]}
# Ops that a spec reaches through syntax only (x + y, -x, A @ B, A.T, x[1:], x > 0).
SYNTAX_ONLY = {"add", "sub", "mul", "div", "neg", "pos", "matmul", "transpose", "slice", "index",
               *(op.name for op in COMPARISONS)}  # pow is both `**` and pow(a, b)
CALLABLE = sorted(set(REGISTRY) - SYNTAX_ONLY)
CONCRETE_ONLY = {"det", "inv"}
SIZE_PARAMS = {"shape", "k", "classes"}  # parameters that may hold size symbols  # no index-notation form: derived per drawn size


def op_table() -> str:
    """The table of ops in docs/ops.md: kind, domain and torch's convention at kinks, from the registry."""
    spelled = {"add": "`+`", "sub": "`-`", "mul": "`*`", "div": "`/`", "pow": "`**`, `pow`", "neg": "unary `-`",
               "pos": "unary `+`", "matmul": "`@`", "transpose": "`.T`", "slice": "`x[a:b]`, `A[:, k]`",
               "less": "`<` in where", "less_equal": "`<=` in where", "greater": "`>` in where",
               "greater_equal": "`>=` in where", "equal": "`==` in where", "not_equal": "`!=` in where",
               "logical_and": "`and` in where", "logical_or": "`or` in where", "logical_not": "`not` in where",
               "index": "`x[t]`, t integers",
               "gelu": "`gelu(...)`: the exact, erf form (torch's default); `approximate=\"tanh\"` is written out: "
                       "`0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`"}
    rows = ["| op | written | kind | domain | at kinks (torch's convention) |", "|---|---|---|---|---|"]
    for op in REGISTRY.values():
        written = spelled.get(op.name, f"`{op.name}(...)`")
        keywords = f" with {', '.join(f'`{p}=`' for p in op.params)}" if op.params else ""
        if op.integer_operands:
            keywords += " (integer " + " and ".join(("first", "second")[k] for k in op.integer_operands) + " operand)"
        rows.append(f"| {op.name} | {written}{keywords} | {op.kind} | {op.domain} | {op.kink or '-'} |")
    return "\n".join(rows)
