"""Sympy formulas -> vectorized numpy functions that also bound their own rounding error.

A formula in index notation compiles once into a tree of closures. Evaluation is
vectorized over a batch of points and over every index: a free index becomes an array
axis, a ``Sum`` (``Product``, maximum) becomes a reduction over a new axis, and ``Indexed``
becomes fancy indexing. Nothing runs per element in Python.

Beside each value the closures carry a running bound on the rounding error of computing
that value in floating point, in units of the unit roundoff ``u`` (first-order forward
error analysis: every operation adds ``|result|``, and each argument's error is scaled by
the magnitude of the partial derivative with respect to it; a step that underflows adds
the smallest normal number, absolutely). Bounds are kept in float64: where a step of the
formula overflows, its bound is infinite, and the point goes to the exact pass, which
evaluates the same closures on arb balls (``exact=True``: ``verify.balls``).
``verify.tolerance`` turns a bound into the allowance of a comparison, so points where the
formula is sensitive get room, and benign points stay tight.

A subexpression that several formulas hold (sin(x[i]) in a value, a gradient and a JVP)
is computed once per batch of points.

**Ambiguous points** are found on the way. A comparison (``where``, a kink, a tie of a
maximum) between values that carry rounding error, closer than the tolerance of the dtype
under test, could go either way in torch. Such points are marked in ``Context.ambiguous``
and decided by the exact pass.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import scipy.special
import sympy
import torch
from sympy.codegen import cfunctions

from . import balls
from .lower import functions
from .lower.sympy import ReducedMax, ReducedMin, Tensor
from .ops import REGISTRY
from .tolerance import Precision, allowed_error, precision, smallest_subnormal, underflow_error, underflow_threshold

ERROR_DTYPE = np.float64
# A subexpression that several formulas share (sin(x[i]) in the value, the gradient and the
# JVP) is computed once per batch, while the batch's shared results take up to this many bytes.
SHARED_BYTES = 2**28
EINSUM_PLANNED = 2**12  # elements of a contraction's grid past which einsum plans its order

# Numeric twins of the sympy functions that formulas and their derivatives contain.
NUMPY_FUNCTIONS = {
    sympy.exp: np.exp, sympy.log: np.log, sympy.sin: np.sin, sympy.cos: np.cos, sympy.tan: np.tan,
    sympy.asin: np.arcsin, sympy.acos: np.arccos, sympy.atan: np.arctan, sympy.sinh: np.sinh, sympy.cosh: np.cosh,
    sympy.tanh: np.tanh, sympy.asinh: np.arcsinh, sympy.acosh: np.arccosh, sympy.atanh: np.arctanh,
    sympy.Abs: np.abs, sympy.sign: np.sign, sympy.atan2: np.arctan2,
    sympy.sinc: lambda x: np.sinc(np.asarray(x) / np.pi), cfunctions.expm1: np.expm1, cfunctions.log1p: np.log1p,
    cfunctions.log2: np.log2, cfunctions.log10: np.log10, functions.expm1: np.expm1,
    functions.sigmoid: scipy.special.expit, functions.logsigmoid: scipy.special.log_expit,
    functions.softplus: lambda x: np.logaddexp(0.0, x),
    functions.power: lambda a, b: np.power(np.asarray(a, dtype=np.float64), b),
    functions.round_half_even: np.round, functions.floor_real: np.floor, functions.ceil_real: np.ceil,
    functions.trunc_real: np.trunc,
}
# Special functions come from scipy, in float64 only, and are accurate to some tens of ulps
# (scipy's erfc is 40 ulps off at 8.3): the float64 pass's own error, which its bounds (and the
# exact pass's model, to keep one rule in both) include, in float64's roundings.
SPECIAL_FUNCTIONS = {
    sympy.erf: scipy.special.erf, sympy.erfc: scipy.special.erfc, sympy.loggamma: scipy.special.gammaln,
    sympy.polygamma: lambda order, x: scipy.special.polygamma(np.asarray(order, dtype=np.int64), x),
}
SCIPY_ROUNDINGS = 128
# What a function's kernel may be off by, in roundings of its result (u |result| each): a
# transcendental function one ulp (SLEEF's u10 kernels, which torch's CPU kernels use), a
# special function as calibrated (benchmarks/calibration.py: torch's float32 trigamma, lgamma's
# second derivative, is off by up to 6 roundings; near digamma's zero an absolute term covers
# more, DIGAMMA_ABSOLUTE; float64's trigamma is 2e6 ulps off, a finding of docs/findings.md).
# Absolute values, signs and roundings to integers are exact.
FUNCTION_ROUNDINGS = 2
SPECIAL_FUNCTION_ROUNDINGS = {sympy.erf: 2, sympy.erfc: 4, sympy.loggamma: 8, sympy.polygamma: 8}
# torch's digamma (polygamma of order 0: the digamma op, and lgamma's derivative wherever a
# formula holds it) is off absolutely near its zero at 1.4616, where a relative bound fails:
# against scipy at 2e7 float32 points in (0.001, 1000), at most 0.91 of 8 roundings plus
# 1e-6 (8.3e-6 at 0.0603, 1.3e-6 at 0.512); in float64, 9.7e-16 against mpmath. The half
# types compute it in float32. Part of the function, so a cotangent scales it.
DIGAMMA_ABSOLUTE = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
# Functions whose torch kernels return 0 below the normal range: sigmoid forms exp(-x), which
# overflows first (float32 sigmoid(-88.73) is 0, not 2.9e-39), and silu and mish use it.
FLUSHING_FUNCTIONS = {functions.sigmoid}
# Powers torch computes as one correctly rounded operation: x * x, 1 / x (sqrt is a function:
# torch's float32 sqrt is 1.5 roundings off).
POWER_ROUNDINGS = {sympy.Integer(2): 1, sympy.Integer(-1): 1}

NUMPY_FUNCTIONS.update(SPECIAL_FUNCTIONS)
# Functions that are never 0: a computed 0 is an underflow, where torch's order of operations
# (exp(x - max) in logsumexp) may keep precision the formula lost.
NEVER_ZERO = {sympy.exp, sympy.erfc, sympy.cosh}
# Functions that jump, each with the jump nearest its argument: a point whose argument,
# carrying rounding error, is that close to a jump is ambiguous.
JUMPS = {sympy.sign: lambda a: 0.0, functions.round_half_even: lambda a: np.floor(a) + 0.5,
         functions.floor_real: np.round, functions.ceil_real: np.round, functions.trunc_real: np.round}
# Functions whose value is exact given their argument's.
EXACT_FUNCTIONS = {sympy.Abs, sympy.sign, sympy.DiracDelta, functions.stop_gradient, *functions.STEPS}
COMPARISONS = {sympy.Lt: np.less, sympy.Le: np.less_equal, sympy.Gt: np.greater,
               sympy.Ge: np.greater_equal, sympy.Eq: np.equal, sympy.Ne: np.not_equal}
REDUCTIONS = {sympy.Sum: (np.sum, 0.0), sympy.Product: (np.prod, 1.0),
              ReducedMax: (np.max, -np.inf), ReducedMin: (np.min, np.inf)}


class UnsupportedFormula(Exception):
    """A formula holds something the compiler has no numeric rule for."""


@dataclass
class Context:
    """What one evaluation sees: variable arrays (value, error), sizes and bound indices.

    ``model`` is how the code under test rounds (``verify.tolerance.Precision``): error
    bounds are in units of its stored dtype's u, and it decides when a comparison is too
    close to call; ``ambiguous`` collects the points where one was. ``left_range`` collects
    the points where a step left its dtype's range (overflowed, or flushed a product of
    nonzero factors to 0): an infinite bound there is a lost one, and elsewhere the bound's
    own arithmetic past float64's range (no finite allowance).
    """

    env: dict
    sizes: dict
    batch: int
    model: Precision = field(default_factory=lambda: precision(torch.float64))
    indices: dict = field(default_factory=dict)  # index symbol -> integer array
    ambiguous: np.ndarray = None
    left_range: np.ndarray = None
    shared: dict = field(default_factory=dict)  # subexpression key -> (value, error), see _Compiler
    shared_bytes: int = 0
    # The computations ("backward", "forward") of which some kernel's exact result is beyond the
    # stored dtype's range, noted by the exact pass: torch's autograd stores each consumer's
    # contribution to an adjoint or a tangent, though their sum may fit. A scalar output's
    # cotangent, which its formulas hold outside, scales the backward's (``backward_scale``).
    overflowed_kernels: set = field(default_factory=set)
    backward_scale: float = 1.0

    def __post_init__(self):
        if self.ambiguous is None:
            self.ambiguous = np.zeros(self.batch, dtype=bool)
        if self.left_range is None:
            self.left_range = np.zeros(self.batch, dtype=bool)
        # Inside a kernel, steps round in the compute dtype; between kernels, in the stored
        # one (or the compute dtype, where one kernel computes it all).
        model = self.model
        outer = model.compute if model.fused else model.dtype
        self.ratios = {False: model.outer_ratio, True: model.kernel_ratio}
        self._steps = {False: outer, True: model.compute}
        # Narrower dtypes overflow in steps where float64 does not (pi * x in sinc at 1e38 in
        # float32): such a step makes the error bound infinite, and the exact pass decides.
        self._limits = {inside: float(torch.finfo(dtype).max) if dtype != torch.float64 else np.inf
                        for inside, dtype in self._steps.items()}
        # A step below the normal range keeps only absolute precision: the smallest subnormal
        # number of its dtype, in units of u.
        self._underflows = {inside: (underflow_threshold(dtype), underflow_error(dtype) / model.u)
                            for inside, dtype in self._steps.items()}

    def ratio(self, inside: bool) -> float:
        """One rounding of a step, inside a kernel or between kernels, in units of u."""
        return self.ratios[inside]

    def op_roundings(self, roundings: float, inside: bool) -> float:
        """What a function of ``roundings`` roundings is off by, in units of u: a half type's
        op computes in float32 and rounds its result once to the stored dtype."""
        if inside or not self.model.stores_kernels or not roundings:
            return roundings * self.ratios[inside]
        return roundings * self.ratios[True] + 1.0

    def limit(self, inside: bool) -> float:
        """The largest finite number of the dtype a step rounds in (inf in float64: it tells itself)."""
        return self._limits[inside]

    def underflows_below(self, inside: bool) -> float:
        """The magnitude below which a step underflows in the dtype it rounds in."""
        return self._underflows[inside][0]

    def underflow_error(self, inside: bool) -> float:
        """What a step below the normal range of the dtype it rounds in may be off by, in units of u."""
        return self._underflows[inside][1]

    def flushes_below(self, inside: bool) -> float:
        """The magnitude below which a step rounds to 0 in the dtype it rounds in: half its
        smallest subnormal number (0 in float64, which cannot hold that half)."""
        dtype = self._steps[inside]
        return smallest_subnormal(dtype) / 2

    def representable(self, value: float, inside: bool) -> bool:
        """Whether a number is exact in the dtype a step rounds in (a constant such as 1/2)."""
        dtype = self._steps[inside]
        return _representable(value, dtype)

    def guard(self, value, error, vanished=False, inside=False):
        """The error bound, made infinite where a step's value overflows the dtype it rounds
        in (float64 overflows to inf by itself), and widened by what underflow costs that dtype
        where it underflows (below the normal range, or to zero where ``vanished`` says a
        product of nonzero factors became 0): there only absolute precision is kept. A zero
        computed with an error may be such an underflow too (exp(-800) times anything, in
        float64), so its bound is at least that cost: float64's own underflow never makes a
        bound vanish."""
        magnitude = np.abs(value)
        threshold, spacing = self._underflows[inside]
        underflow = ((magnitude < threshold) & (magnitude > 0)) | vanished
        if np.any(underflow):
            error = np.where(underflow, error + spacing, error)
        with np.errstate(invalid="ignore"):
            computed_zero = (magnitude == 0) & (np.asarray(error) > 0)
        if np.any(computed_zero):
            error = np.where(computed_zero, np.maximum(error, spacing), error)
        limit = self._limits[inside]
        if not np.isinf(limit) and np.any(magnitude > limit):
            error = np.where(magnitude > limit, np.inf, error)
            self.note_left_range(magnitude > limit)
        if np.any(np.isinf(magnitude)):  # float64 itself overflowed
            self.note_left_range(np.isinf(magnitude))
        return error

    def mark_ambiguous(self, close):
        self.ambiguous |= self._per_point(close)

    def note_left_range(self, beyond):
        self.left_range |= self._per_point(beyond)

    def _per_point(self, mask) -> np.ndarray:
        """Per point, whether ``mask`` (an array over the batch, or a scalar for every point) holds."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.ndim:
            return np.broadcast_to(mask, (self.batch,))
        return np.broadcast_to(mask.reshape(mask.shape[0], -1).any(axis=1), (self.batch,))


class Reference:
    """One compiled formula: ``reference(ctx)`` gives (value, error bound), shape (batch, *dims).

    ``a_priori``: the bound is at least the formula over the magnitudes of its terms
    (``_magnitude``). ``reference.estimate(ctx)`` gives the same value without the error
    arithmetic, beside a floor of the error bound.
    """

    def __init__(self, tensor: Tensor, size_names: frozenset, a_priori: bool = False):
        self.tensor = tensor
        self.axes = {index: axis + 1 for axis, index in enumerate(tensor.indices)}
        depth = len(tensor.indices)
        expr = self._expr = tensor.expr
        self._compiled = _Compiler(size_names).compile(expr, self.axes, depth)
        values_only = _Compiler(size_names, track_errors=False)
        self._value = values_only.compile(expr, self.axes, depth)
        # The last step of the formula rounds its result (a floor of any bound of it), inside a
        # fused kernel or not.
        self._root = _rounds(expr)
        floor = _Compiler(size_names, track_errors=False, floor=True)
        self._magnitude = floor.compile(_magnitude(expr), self.axes, depth) if a_priori else None
        self._kernel = self._root and _fused(expr)
        self._size_names = size_names
        self._exact = None  # compiled on first use: most formulas never need the exact pass

    def exact(self, ctx: Context) -> tuple:
        """(value, a priori error bound) as object arrays of balls, shape (batch, *dims), in a
        context whose variables are balls (``verify.exact``). The bound is the formula taken
        over the magnitudes of its terms: what computing each term to a relative rounding may
        be off by (0 where the formula has no a priori bound)."""
        if self._exact is None:
            depth = len(self.tensor.indices)
            floor = _Compiler(self._size_names, exact=True, floor=True)
            self._exact = (_Compiler(self._size_names, exact=True).compile(self._expr, self.axes, depth),
                           floor.compile(_magnitude(self._expr), self.axes, depth) if self._magnitude else None)
        full = self._bind(ctx)
        value = np.broadcast_to(np.asarray(self._exact[0](ctx)[0], dtype=object), full)
        if self._exact[1] is None:
            magnitude = np.zeros(full, dtype=np.int64)
        else:
            magnitude = np.broadcast_to(np.asarray(self._exact[1](ctx)[0], dtype=object), full) * balls.constant(
                sympy.Rational(ctx.ratio(False)))
        return np.array(balls.to_balls(np.array(value)), dtype=object), np.array(balls.to_balls(np.array(magnitude)))

    def __call__(self, ctx: Context) -> tuple:
        full = self._bind(ctx)
        with np.errstate(all="ignore"):
            value, error = self._compiled(ctx)
        value = np.array(np.broadcast_to(value, full), dtype=np.float64)
        error = np.array(np.broadcast_to(error, full), dtype=ERROR_DTYPE)
        magnitude = self._floor(ctx, full)
        # A lost step (error NaN) stays lost; an undefined magnitude leaves the bound as it is.
        return value, error if magnitude is None else np.where(np.isnan(magnitude), error, np.maximum(error, magnitude))

    def estimate(self, ctx: Context) -> tuple:
        """(value, a floor of its error bound): the a priori bound where the formula has one,
        and the rounding of its last step, where it has one."""
        full = self._bind(ctx)
        with np.errstate(all="ignore"):
            value = np.array(np.broadcast_to(self._value(ctx)[0], full), dtype=np.float64)
            root = ctx.ratio(self._kernel) * np.abs(value) if self._root else np.zeros(full, dtype=ERROR_DTYPE)
            if self._kernel and ctx.model.stores_kernels:
                root = root + np.abs(value)
        magnitude = self._floor(ctx, full)
        # An undefined magnitude gives no floor; an infinite one stays infinite (the point is left to the bounds).
        floor = root if magnitude is None else np.maximum(root, np.nan_to_num(magnitude, nan=0.0, posinf=np.inf))
        return value, np.nan_to_num(floor, nan=0.0, posinf=np.inf)

    def _bind(self, ctx: Context) -> tuple:
        """Bind the output indices to their axes; the full shape of a result, (batch, *dims)."""
        shape = tuple(_size(d, ctx.sizes) for d in self.tensor.shape)
        for index, axis in self.axes.items():
            ctx.indices[index] = np.arange(shape[axis - 1]).reshape(_axis_shape(axis, len(shape)))
        return (ctx.batch, *shape)

    def _floor(self, ctx: Context, full: tuple):
        if self._magnitude is None:
            return None
        with np.errstate(all="ignore"):
            return ctx.ratio(False) * np.broadcast_to(np.asarray(self._magnitude(ctx)[0], dtype=ERROR_DTYPE), full)


def _fused(expr) -> bool:
    """Whether ``expr`` is marked as one fused kernel of its op's (in some dtype: a floor)."""
    return isinstance(expr, functions.kernel) and expr.computation in REGISTRY[expr.op].fused


def _rounds(expr) -> bool:
    """Whether the formula's last step is arithmetic or a function that rounds its result."""
    if isinstance(expr, functions.kernel):
        return _rounds(expr.args[0])
    if expr.is_Add or expr.is_Mul or expr.is_Pow or isinstance(expr, (sympy.Sum, sympy.Product)):
        return True
    return isinstance(expr, sympy.Function) and type(expr) not in EXACT_FUNCTIONS


def _magnitude(expr):
    """``expr`` with every sum and product taken over the magnitudes of its terms.

    The running bound follows sympy's form of a derivative, and torch computes an equal form
    in another order: var's JVP is sum(t * (A - mean(A))) in torch and
    sum((A - mean(A)) * (t - mean(t))) in sympy. At a constant A and t both of sympy's factors
    are exactly 0, so its bound is 0, while torch rounds mean(A) and keeps u * |t| * |A|.
    Evaluated over magnitudes, the a priori bound of any order of the same terms, the
    formula gives the floor of such a bound. A kernel's terms round as its steps do, unless
    it reads its op's saved result, whose rounding in the stored dtype reaches every term.
    """
    if isinstance(expr, functions.kernel):
        return type(expr)(_magnitude(expr.args[0]))
    if expr.is_Add or expr.is_Mul:
        return type(expr)(*(_magnitude(a) for a in expr.args))
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        return _magnitude(expr.base) ** expr.exp
    if isinstance(expr, sympy.Sum):
        return sympy.Sum(_magnitude(expr.function), *expr.limits)
    return sympy.Abs(expr)


@functools.lru_cache(maxsize=2**10)
def _representable(value: float, dtype: torch.dtype) -> bool:
    return math.isfinite(value) and float(torch.tensor(value, dtype=dtype).double()) == value


def _reciprocal(expr) -> bool:
    return expr.is_Pow and expr.exp == -1


def _power_of_two(expr) -> bool:
    """Whether ``expr`` is a number ±2**k, whose products are exact."""
    if not expr.is_Rational or expr == 0:
        return False
    p, q = abs(int(expr.p)), int(expr.q)
    return p & (p - 1) == 0 and q & (q - 1) == 0


def _exact_multiplier(expr) -> bool:
    """Whether multiplying by ``expr`` is exact: a power of two, or a 0-or-1 selector (a
    Kronecker delta, an indicator), as index notation writes a gather or a one-hot."""
    return _power_of_two(expr) or isinstance(expr, (sympy.KroneckerDelta, functions.indicator))


def _absolute(kernel_error, ctx: Context) -> float:
    """A kernel's calibrated absolute error in the dtype under test, in units of its u."""
    return kernel_error.absolute.get(ctx.model.dtype, 0.0) / ctx.model.u


def _kernel_error(kernel_error, value, ctx: Context):
    """What a kernel's calibrated errors add to its result's bound, in units of u: roundings
    in the dtype it computes in (float32 for a half type, fused or not), and in the stored
    dtype, and an absolute error."""
    magnitude = _wide(value)
    shift = np.abs(np.log(np.maximum(magnitude, 1e-300)))  # about |x - max| where a kernel forms exp(x - max)
    roundings = kernel_error.roundings + (shift if kernel_error.log_roundings else 0)
    stored = kernel_error.stored_roundings + (shift if kernel_error.stored_log_roundings else 0)
    rounding = roundings * ctx.ratio(True) + stored * ctx.ratio(False)
    return rounding * magnitude + _absolute(kernel_error, ctx)


def _shifted_exponentials(formula):
    """``formula`` with its sum of exponentials taken relative to their largest argument m, as
    torch's softmax kernels compute it: log(Sum(exp(a))) as m + log(Sum(exp(a - m))),
    exp(b) / Sum(exp(a)) as exp(b - m) / Sum(exp(a - m)), and exp(b) * Sum(exp(a) * t) as
    exp(b + m) * Sum(exp(a - m) * t). Exact math either way (m cancels), and nothing
    overflows where exp(a) alone would."""
    sums = {s for s in formula.atoms(sympy.Sum) if len(_exponential_factors(s.function)) == 1}
    if len(sums) != 1:
        return formula
    (total,) = sums
    (exponential,) = _exponential_factors(total.function)
    largest = ReducedMax(exponential.args[0], *total.limits)
    shifted = total.xreplace({exponential: sympy.exp(functions.shifted(exponential.args[0], largest))})

    def rewritten(expr):
        if isinstance(expr, sympy.log) and expr.args[0] == total:
            return functions.shifted(sympy.log(shifted), -largest)
        if expr.is_Mul:
            powers = [f for f in expr.args if f == total or f.is_Pow and f.base == total and f.exp in (1, -1)]
            outside = _exponential_factors(expr)
            if len(powers) == 1 and len(outside) == 1:
                power = -1 if powers[0].is_Pow and powers[0].exp == -1 else 1
                rest = [rewritten(f) for f in expr.args if f is not powers[0] and f is not outside[0]]
                return sympy.Mul(shifted**power, sympy.exp(functions.shifted(outside[0].args[0], -power * largest)),
                                 *rest)
        return expr.func(*map(rewritten, expr.args)) if expr.args else expr

    return rewritten(formula)


def _exponential_factors(expr) -> list:
    """The exponentials among the factors of ``expr`` (itself, where it is one)."""
    return [f for f in (expr.args if expr.is_Mul else (expr,)) if isinstance(f, sympy.exp)]


def summation_roundings(terms):
    """Roundings of the sum of its terms' magnitudes that a sum of ``terms`` terms may be off by
    (per element where it is an array): torch sums pairwise and in blocks, so about log2 of
    them, and one more for the order within a block (calibrated: float32 sums of 8 terms are
    off by 3.1 roundings of their magnitudes)."""
    terms = np.asarray(terms)
    return np.where(terms > 1, np.ceil(np.log2(np.maximum(terms, 1))) + 1, 0)


def _function_absolute(expr, ctx: Context) -> float:
    """A function kernel's calibrated absolute error in the dtype under test, in units of its u
    (0 but for digamma's)."""
    if type(expr) is sympy.polygamma and expr.args[0] == 0:
        return DIGAMMA_ABSOLUTE[ctx.model.dtype] / ctx.model.u
    return 0.0


def function_roundings(function_class) -> int:
    """How many roundings of its result a function's kernel may be off by."""
    if function_class in EXACT_FUNCTIONS:
        return 0
    return SPECIAL_FUNCTION_ROUNDINGS.get(function_class, FUNCTION_ROUNDINGS)


def per_point(array, like):
    """A per-point array (batch,) shaped to broadcast against ``like`` (batch, *dims)."""
    return array.reshape((len(array),) + (1,) * (like.ndim - 1))


def _size(dim, sizes) -> int:
    if isinstance(dim, int):
        return dim
    return int(dim.xreplace({s: sympy.Integer(sizes[s.name]) for s in dim.free_symbols}))


def _axis_shape(axis: int, depth: int) -> tuple:
    shape = [1] * (depth + 1)
    shape[axis] = -1
    return tuple(shape)


def _wide(array):
    return np.abs(np.asarray(array, dtype=ERROR_DTYPE))


def _plus(total: np.ndarray, term):
    """``total + term``, in place when ``total`` (a fresh array, not a numpy scalar) has the
    shape of the sum: at 10**6 elements a new array costs more in page faults than the addition."""
    if isinstance(total, np.ndarray) and total.shape == np.broadcast_shapes(total.shape, np.shape(term)):
        return np.add(total, term, out=total)
    return total + term


def _scaled(error, factor):
    """``error * |factor|``, where an exact operand (error 0) stays exact even if factor is inf,
    and a step that lost its precision (error inf) stays lost even through a zero factor."""
    scaled = error * np.abs(factor)
    # Only 0 * inf and inf * 0 make NaN here (the terms are >= 0): rare, so mended after.
    if np.isnan(np.sum(scaled)):
        undefined = np.isnan(scaled)
        scaled = np.where(undefined & np.isinf(error), np.inf, scaled)
        scaled = np.where(undefined & np.equal(error, 0), 0.0, scaled)
    return scaled


def _product(arrays):
    return functools.reduce(np.multiply, arrays)


def _product_except(arrays: list, left_out: tuple):
    """The product of ``arrays`` but those at the positions ``left_out``, scalars first."""
    kept = sorted((a for k, a in enumerate(arrays) if k not in left_out), key=np.ndim)
    return _product(kept) if kept else 1.0


def _summed_product(arrays: list, lengths: dict, depth: int, inner_depth: int, dtype=np.float64) -> np.ndarray:
    """The sum over axes depth + 1 to inner_depth of the product of ``arrays``, which broadcast
    against each other on inner_depth + 1 axes, by einsum. ``lengths`` gives each summed axis's
    length: a sum over an axis no factor spans multiplies by it. ``dtype`` object: balls."""
    scale = 1.0
    operands, spanned = [], set()
    for array in arrays:
        array = np.asarray(array, dtype=dtype)
        if array.ndim == 0:
            scale = scale * array
            continue
        array = _pad(array, inner_depth)
        labels = [axis for axis in range(inner_depth + 1) if array.shape[axis] != 1]
        operands += [array.reshape([array.shape[axis] for axis in labels]), labels]
        spanned.update(labels)
    for axis, length in lengths.items():
        if axis not in spanned:
            scale = scale * length
    kept = [axis for axis in range(depth + 1) if axis in spanned]
    if not operands:
        return np.asarray(scale, dtype=dtype)
    extents = {}
    for array, labels in zip(operands[::2], operands[1::2]):
        extents.update(zip(labels, array.shape))
    # Planning the contraction (pairwise, by BLAS) costs tens of microseconds: worth it past small grids.
    result = np.asarray(np.einsum(*operands, kept, optimize=math.prod(extents.values()) > EINSUM_PLANNED) * scale,
                        dtype=dtype)  # einsum of balls to no axis gives a ball, not an array
    return result.reshape([result.shape[kept.index(axis)] if axis in spanned else 1 for axis in range(depth + 1)])


def _summed_product_of_balls(factors: list, lengths: dict, depth: int, inner_depth: int, inside: bool,
                             roundings: int):
    """``_summed_product`` on balls, widened as the formed sum is in the modelled mode: each
    product by its roundings (``balls.rounded``), then the sum by one rounding of the sum of
    the products' magnitudes (``balls.rounded_sum``)."""
    total = _summed_product(factors, lengths, depth, inner_depth, dtype=object)
    if balls.MODE.rounding is None:
        return total
    magnitude = _summed_product([np.abs(np.asarray(f, dtype=object)) for f in factors], lengths, depth, inner_depth,
                                dtype=object)
    products = balls.rounded(magnitude, roundings, inside)  # the terms' magnitudes, each product rounded
    nonzero = [balls.may_be_nonzero(f).astype(np.float64) for f in factors]
    terms = _summed_product(nonzero, lengths, depth, inner_depth)
    return balls.rounded_sum(total + (products - magnitude), [products], inside, summation_roundings(terms))


def _summed_product_bounded(factors: list, lengths: dict, depth: int, inner_depth: int, ctx,
                            inside: bool, roundings: int) -> tuple | None:
    """(value, error bound) of ``_summed_product`` of the factors' (value, error) pairs, the
    bound being what ``_Mul`` and the Sum give the formed product, each of its terms a sum of
    products itself: ``roundings`` |product| for the product's roundings (one per factor past
    the first that is no exact multiplier), each factor's error times
    the other factors' magnitudes, the second-order term of each pair of erring factors, then
    the sum's own rounding. At a point where a term might underflow the dtype, each term may
    cost what underflow does (the formed product's guard counts only those that do). None
    where a term might overflow, which the formed product's guard judges term by term."""
    values = [np.asarray(value, dtype=np.float64) for value, _ in factors]
    errors = [np.asarray(error, dtype=ERROR_DTYPE) for _, error in factors]
    magnitudes = [_wide(value) for value in values]
    with np.errstate(all="ignore"):
        largest = math.prod(float(np.max(m, initial=0.0)) for m in magnitudes)
        smallest = _product([_smallest_nonzero(m, inner_depth) for m in magnitudes])  # per point, at most any term
    if not largest <= ctx.limit(inside):
        return None

    def summed(arrays):
        return _summed_product(arrays, lengths, depth, inner_depth)

    magnitude = summed(magnitudes)
    rounding = ctx.ratio(inside)
    terms = math.prod(lengths.values())
    # Exact zeros add exactly: a sum of one nonzero term per element (a one-hot product, an
    # output's adjoint formed as a sum of deltas) rounds as that term alone.
    selecting = [(v != 0) | (e > 0) for v, e in zip(values, errors)]
    nonzero_terms = (summed([s.astype(np.float64) for s in selecting]) if not all(np.all(s) for s in selecting)
                     else terms)
    error = roundings * rounding * magnitude
    carrying = [k for k, e in enumerate(errors) if np.any(e)]
    for k in carrying:
        error = error + summed([errors[k] if j == k else m for j, m in enumerate(magnitudes)])
    for a, b in itertools.combinations(carrying, 2):
        error = error + ctx.model.u * summed(
            [errors[j] if j in (a, b) else m for j, m in enumerate(magnitudes)])
    # 0 * inf in a term: an exact zero through an overflowed step, or a lost step through a
    # zero. The formed product tells them apart; here the bound is given up (inf).
    error = np.where(np.isnan(error), np.inf, error)
    underflowing = smallest < ctx.underflows_below(inside)
    if np.any(underflowing):
        error = error + np.where(underflowing.reshape((-1,) + (1,) * depth), terms * ctx.underflow_error(inside), 0.0)
    return summed(values), ctx.guard(magnitude, error + rounding * summation_roundings(nonzero_terms) * magnitude,
                                     inside=inside)


def _smallest_nonzero(magnitude, depth: int) -> np.ndarray:
    """Per point (or for all, where ``magnitude`` has no batch axis), its smallest nonzero element."""
    rows = _pad(np.asarray(magnitude), depth)
    rows = rows.reshape(rows.shape[0] if rows.ndim else 1, -1)
    return np.min(rows, axis=1, where=rows > 0, initial=np.inf)


def _flattened(array, summed: tuple) -> np.ndarray:
    """``array`` with its summed axes (the trailing ones) as one last axis, in row-major order."""
    array = np.asarray(array)
    return array.reshape(array.shape[:summed[0]] + (-1,))


def _partial_products_error(value, error, inside, summed: tuple, ctx: Context, within: bool):
    """The error bound of a product taken in index order, as torch multiplies (cumprod, and
    prod of a row): each partial product rounds, one below the normal range costs what
    underflow costs there, which the later factors scale, and one beyond the dtype's range,
    or flushed to 0 there while no factor is 0, loses the bound (inf), as any step that
    leaves the range does: torch's own prod is then rejected there, and code is judged
    exactly."""
    value, error, inside = _flattened(value, summed), _flattened(error, summed), _flattened(inside, summed)
    if not value.shape[-1]:  # an empty product is exactly 1
        return np.zeros(value.shape[:-1])
    with np.errstate(all="ignore"):
        partial = np.cumprod(value, axis=-1)
        magnitude = np.abs(partial)
        before = np.concatenate([np.ones_like(magnitude[..., :1]), magnitude[..., :-1]], axis=-1)
        multiplied = inside & (np.arange(value.shape[-1]) > np.argmax(inside, axis=-1)[..., None])
        step = np.where(multiplied, ctx.ratio(within) * magnitude, 0.0) + _scaled(error, before)
        threshold, spacing = ctx._underflows[within]
        vanished = (partial == 0) & np.logical_and.accumulate(value != 0, axis=-1)
        step = step + np.where(multiplied & (((magnitude < threshold) & (magnitude > 0)) | vanished), spacing, 0.0)
        # Each step's error is scaled by the factors after it.
        later = np.flip(np.cumprod(np.flip(np.abs(value), axis=-1), axis=-1), axis=-1)
        later = np.concatenate([later[..., 1:], np.ones_like(later[..., :1])], axis=-1)
        total = _scaled(step, later).sum(axis=-1)
        # Beyond the dtype's range (or float64's), or below half the dtype's smallest number
        # (or 0 already in float64, where that half is 0) while no factor is 0.
        vanishing = (magnitude < ctx.flushes_below(within)) | (magnitude == 0)
        left = multiplied & ((magnitude > ctx.limit(within)) | np.isinf(magnitude) | vanishing & np.logical_and.accumulate(value != 0, axis=-1))
        left = np.any(left, axis=-1)
        if np.any(left):
            total = np.where(left, np.inf, total)
            ctx.note_left_range(left)
    return total


def _partial_products_of_balls(value, inside, summed: tuple, within: bool):
    """A product of balls taken in index order, each partial product widened as the modelled
    mode rounds a step (``_partial_products_error`` on balls)."""
    value, inside = _flattened(value, summed), _flattened(inside, summed)
    started = np.zeros(value.shape[:-1], dtype=bool)
    product = np.ones(value.shape[:-1], dtype=object)
    for k in range(value.shape[-1]):
        taken = inside[..., k]
        multiplied = np.asarray(product * value[..., k], dtype=object)
        product = np.where(taken, np.where(started, balls.rounded(multiplied, 1, within), value[..., k]), product)
        started |= taken
    return product


def _spans_whole(positions: np.ndarray, size: int) -> bool:
    """Whether an index's positions (an increasing range) are 0, 1, ..., size - 1."""
    return positions.size == size and (size == 0 or positions.flat[0] == 0)


def _placed(array: np.ndarray, axes: list, depth: int) -> np.ndarray:
    """``array`` (batch, *dims) with its k-th dim moved to axis ``axes[k]`` of depth + 1 axes."""
    order = sorted(range(len(axes)), key=axes.__getitem__)
    shape = [array.shape[0]] + [1] * depth
    for k in order:
        shape[axes[k]] = array.shape[1 + k]
    return array.transpose([0] + [1 + k for k in order]).reshape(shape)


def _pad(array, depth: int):
    """Give an array depth + 1 axes by adding trailing ones, so that broadcasting aligns axes."""
    if not isinstance(array, np.ndarray):
        return array
    return array.reshape(array.shape + (1,) * (depth + 1 - array.ndim))


def _too_close(ctx: Context, left, right, error) -> np.ndarray:
    """Where a comparison of values carrying rounding error is within the dtype's tolerance."""
    if not np.any(error):
        return np.zeros((), dtype=bool)
    return (np.abs(np.asarray(left) - np.asarray(right)) <= allowed_error(error, ctx.model)) & (error > 0)


# (subtree, depth, error arithmetic, exact, size names, its free indices' axes) -> its compiled function
_COMPILED = {}
COMPILED_ENTRIES = 2**16


class _Compiler:
    """One method per sympy class, found along the class's MRO as sympy's printers do."""

    def __init__(self, size_names: frozenset, track_errors: bool = True, exact: bool = False, floor: bool = False,
                 inside: bool = False):
        self.size_names = size_names
        self.track_errors = track_errors and not exact
        # On object arrays of arb balls (verify.balls), values only: the exact pass.
        self.exact = exact
        # A formula over magnitudes (``_magnitude``): a kernel's terms count as its steps round.
        self.floor = floor
        # Inside a kernel (``functions.kernel``): its steps round in the compute dtype.
        self.inside = inside

    def _within(self) -> _Compiler:
        """The compiler of a kernel's steps."""
        return _Compiler(self.size_names, self.track_errors, self.exact, self.floor, inside=True)

    def _real(self, array):
        """An array of reals: float64, or as it is (balls) in the exact pass."""
        return np.asarray(array, dtype=object if self.exact else np.float64)

    def compile(self, expr, axes: dict, depth: int):
        # Formulas hold the same subtree many times over (a softmax of a softmax holds its
        # input in every term): compiled once, the walk is linear in the distinct subtrees.
        key = (expr, depth, self.track_errors, self.exact, self.floor, self.inside, self.size_names,
               tuple(sorted((s.name, axes[s]) for s in _free_symbols(expr) if s in axes)))
        compiled = _COMPILED.get(key)
        if compiled is None:
            if len(_COMPILED) > COMPILED_ENTRIES:
                _COMPILED.clear()
            compiled = _COMPILED[key] = self._compiled(expr, axes, depth)
        return compiled

    def _compiled(self, expr, axes: dict, depth: int):
        if self.track_errors and not any(isinstance(s, sympy.Indexed) for s in _free_symbols(expr)) \
                and expr.is_integer:
            # Index and size arithmetic (i - n, m + n) is exact.
            exact = _Compiler(self.size_names, track_errors=False)
            compiled = exact.compile(expr, axes, depth)
            return lambda ctx: (compiled(ctx)[0], 0.0)
        for cls in type(expr).__mro__:
            method = getattr(self, "_" + cls.__name__, None)
            if method is not None:
                return self._shared(expr, axes, depth, method(expr, axes, depth))
        raise UnsupportedFormula(f"no numeric rule for {type(expr).__name__} in {expr}")

    def _shared(self, expr, axes, depth, compiled):
        """``compiled``, evaluated once per context for all formulas that hold ``expr``.

        Two occurrences give the same arrays when their free indices sit on the same axes
        and span the same ranges, whatever the indices are called: the key names each index
        by its axis, and the spans are read at evaluation time. Leaves are cheap, so they are
        not shared.
        """
        symbols = _free_symbols(expr)
        placed = {s: axes[s] for s in symbols if s in axes}
        if expr.is_Atom or isinstance(expr, sympy.Indexed) or any(
                s.is_integer and s not in placed and s.name not in self.size_names for s in symbols):
            return compiled
        indices = sorted(placed, key=placed.__getitem__)
        static = (_canonical(expr, tuple((s, placed[s]) for s in indices)), depth)
        track_errors = self.track_errors
        flavour = (self.exact, self.floor, self.inside)
        # A value computed with its error bound, inside a kernel or not, serves a value alone too.
        serving = [(static, track_errors) + flavour]
        if not track_errors and not self.floor:
            serving += [(static, True, self.exact, False, inside) for inside in (False, True)]

        def shared(ctx):
            spans = tuple((int(ctx.indices[s].flat[0]), ctx.indices[s].size) for s in indices)
            found = None
            for key in serving:
                found = ctx.shared.get(key + (spans,))
                if found is not None:
                    break
            if found is not None:
                return found
            result = compiled(ctx)
            size = sum(np.asarray(part).nbytes for part in result)
            if ctx.shared_bytes + size <= SHARED_BYTES:
                ctx.shared[serving[0] + (spans,)] = result
                ctx.shared_bytes += size
            return result

        return shared

    def _mark_ambiguous(self, ctx, close):
        # Without tracked errors there is no rounding to judge closeness by.
        if self.track_errors:
            ctx.mark_ambiguous(close)

    def _args(self, expr, axes, depth):
        return [self.compile(a, axes, depth) for a in expr.args]

    # -- leaves --------------------------------------------------------------------------
    def _Number(self, expr, axes, depth):
        """A constant: exact, or rounded once where the dtype its step rounds in cannot hold it (1/3)."""
        value = float(expr)
        exact = expr.is_Rational and sympy.Rational(value) == expr
        inside = self.inside
        if self.exact:  # built at evaluation time, in the precision of the moment
            return lambda ctx: (balls.constant(expr) if exact and ctx.representable(value, inside) else
                                balls.rounded(balls.constant(expr), 1, inside), 0.0)
        return lambda ctx: (value, 0.0 if exact and ctx.representable(value, inside) else
                            ctx.ratio(inside) * abs(value))

    _NumberSymbol = _Number

    def _NaN(self, expr, axes, depth):
        return lambda ctx: (np.nan, 0.0)

    _ComplexInfinity = _NaN  # 1/0 folded by sympy: undefined, so the point is rejected

    def _BooleanTrue(self, expr, axes, depth):
        return lambda ctx: (True, 0.0)

    def _BooleanFalse(self, expr, axes, depth):
        return lambda ctx: (False, 0.0)

    def _Symbol(self, expr, axes, depth):
        if expr.name in self.size_names:
            return lambda ctx: (ctx.sizes[expr.name], 0.0)
        def variable(ctx):
            value, error = ctx.env[expr.name]
            shape = (ctx.batch,) + (1,) * depth
            return self._real(value).reshape(shape), error.reshape(shape)

        if expr.is_integer:  # an index, bound by the output axes or by a reduction; or an integer node
            return lambda ctx: (_pad(ctx.indices[expr], depth), 0.0) if expr in ctx.indices else variable(ctx)
        return variable

    def _Indexed(self, expr, axes, depth):
        name = expr.base.name
        positions = [self.compile(i, axes, depth) for i in expr.indices]
        # x[i], A[i, j]: each index an axis of its own, so when it spans the whole dim the
        # element array is the variable's array with its axes moved, a view, not a gather.
        own_axes = [axes.get(i) for i in expr.indices]
        whole = None not in own_axes and len(set(own_axes)) == len(own_axes)

        def indexed(ctx):
            value, error = ctx.env[name]
            if whole and all(_spans_whole(ctx.indices[i], value.shape[k + 1]) for k, i in enumerate(expr.indices)):
                error = np.broadcast_to(error, value.shape)
                return self._real(_placed(value, own_axes, depth)), _placed(error, own_axes, depth)
            where = (np.arange(ctx.batch).reshape((ctx.batch,) + (1,) * depth),)
            # Clipped: a Piecewise evaluates every branch, also where its own index is out of range.
            where += tuple(np.clip(self._positions(p(ctx)[0]), 0, value.shape[axis + 1] - 1)
                           for axis, p in enumerate(positions))
            return self._real(value[where]), error[where]

        return indexed

    # -- arithmetic ----------------------------------------------------------------------
    def _Add(self, expr, axes, depth):
        terms = self._args(expr, axes, depth)
        inside = self.inside
        if self.exact:
            def add_balls(ctx):
                values = [t(ctx)[0] for t in terms]
                return balls.rounded_sum(sum(values), values, inside, len(values) - 1), 0.0

            return add_balls
        if not self.track_errors:
            return lambda ctx: (sum(t(ctx)[0] for t in terms), 0.0)

        def add(ctx):
            values, errors = zip(*(t(ctx) for t in terms))
            # Summing k terms rounds k - 1 times, each time by at most the sum of magnitudes.
            value = sum(values)
            rounding = (len(values) - 1) * ctx.ratio(inside)
            return value, ctx.guard(value, sum(errors) + rounding * sum(_wide(v) for v in values), inside=inside)

        return add

    def _Mul(self, expr, axes, depth):
        # a * b**-1 is a division, one rounding, as code computes it: the reciprocal is not
        # rounded of its own (but for one that is all the product has, as in 2 / b).
        rounded = [f for f in expr.args if not _exact_multiplier(f)]
        divisors = [f for f in rounded if _reciprocal(f)]
        factors = [self._raised(f, axes, depth, roundings=0) if _reciprocal(f) and len(divisors) < len(rounded)
                   else self.compile(f, axes, depth) for f in expr.args]
        inside = self.inside
        # A scaling by a power of 2 (2 * x, -x, x / 2), or a selection by 0 or 1, is exact.
        roundings = max(len(rounded) - 1, 0)
        if self.exact:
            return lambda ctx: (balls.rounded(_product([f(ctx)[0] for f in factors]), roundings, inside), 0.0)
        if not self.track_errors:
            return lambda ctx: (_product([f(ctx)[0] for f in factors]), 0.0)

        def mul(ctx):
            values, errors = zip(*(f(ctx) for f in factors))
            product = _product(values)
            magnitudes = [_wide(v) for v in values]
            carrying = [k for k, e in enumerate(errors) if np.any(e)]
            error = roundings * ctx.ratio(inside) * _wide(product)
            for k in carrying:
                error = _plus(error, _scaled(errors[k], _product_except(magnitudes, (k,))))
            for a, b in itertools.combinations(carrying, 2):
                # Second order: two factors that both carry error, near zero both (e.g. cancelled).
                error = _plus(error, _scaled(np.multiply(errors[a], errors[b]) * ctx.model.u,
                                             _product_except(magnitudes, (a, b))))
            vanished = np.equal(product, 0)
            for v in values:
                vanished = vanished & np.not_equal(v, 0)
            return product, ctx.guard(product, error, vanished, inside)

        return mul

    def _Pow(self, expr, axes, depth):
        roundings = POWER_ROUNDINGS.get(expr.exp, FUNCTION_ROUNDINGS) if expr.exp.is_Number else FUNCTION_ROUNDINGS
        return self._raised(expr, axes, depth, roundings)

    def _raised(self, expr, axes, depth, roundings):
        base, exponent = self._args(expr, axes, depth)
        inside = self.inside
        if self.exact:
            return lambda ctx: (balls.op_rounded(balls.power(base(ctx)[0], exponent(ctx)[0]), roundings, inside), 0.0)
        if not self.track_errors:
            return lambda ctx: (np.power(np.asarray(base(ctx)[0], dtype=np.float64), exponent(ctx)[0]), 0.0)

        def power(ctx):
            (b, b_error), (p, p_error) = base(ctx), exponent(ctx)
            b = np.asarray(b, dtype=np.float64)
            value = np.power(b, p)
            wide_base = np.asarray(b, dtype=ERROR_DTYPE)
            error = ctx.op_roundings(roundings, inside) * _wide(value) + _scaled(
                b_error, p * np.power(wide_base, np.asarray(p, dtype=ERROR_DTYPE) - 1))
            if np.any(b_error) and np.all(np.asarray(p) > 1):
                # Second order: a base that is a computed zero still has |error|**p of room.
                u = ctx.model.u
                error = error + np.power(_wide(b_error) * u, np.asarray(p, dtype=ERROR_DTYPE)) / u
            if np.any(p_error):
                error = error + _scaled(p_error, value * np.log(np.abs(wide_base)))
            return value, ctx.guard(value, error, np.equal(value, 0) & np.not_equal(b, 0), inside)

        return power

    def _floor(self, expr, axes, depth):
        # Index arithmetic stays in integers: floor(k/m + l*n/m) in floats can land just
        # below an integer and floor to the wrong index.
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        top, bottom = self.compile(numerator, axes, depth), self.compile(denominator, axes, depth)
        return lambda ctx: (np.floor_divide(np.asarray(top(ctx)[0], dtype=np.int64),
                                            np.asarray(bottom(ctx)[0], dtype=np.int64)), 0.0)

    def _Mod(self, expr, axes, depth):
        left, right = self._args(expr, axes, depth)
        return lambda ctx: (np.mod(left(ctx)[0], right(ctx)[0]), 0.0)

    def _Function(self, expr, axes, depth):
        if isinstance(expr, functions.stop_gradient):  # its argument, value and error bound alike
            return self._args(expr, axes, depth)[0]
        if isinstance(expr, functions.shifted):  # a - m, one rounding, m's error cancelling
            minuend, shift = self._args(expr, axes, depth)
            inside = self.inside
            if self.exact:
                return lambda ctx: (balls.rounded(minuend(ctx)[0] - balls.midpoints(shift(ctx)[0]), 1, inside), 0.0)

            def shifted(ctx):
                value, error = minuend(ctx)
                value = value - shift(ctx)[0]
                return value, ctx.guard(value, error + ctx.ratio(inside) * _wide(value), inside=inside)

            return shifted
        if isinstance(expr, sympy.DiracDelta):  # torch's derivative of a jump: exactly 0
            argument = self.compile(expr.args[0], axes, depth)
            kind = np.int64 if self.exact else np.float64
            return lambda ctx: (np.zeros(np.shape(argument(ctx)[0]), dtype=kind), 0.0)
        numeric = (balls.FUNCTIONS if self.exact else NUMPY_FUNCTIONS).get(type(expr))
        if numeric is None:
            raise UnsupportedFormula(f"no numeric rule for the function {type(expr).__name__}")
        arguments = self._args(expr, axes, depth)
        nearest_jump = JUMPS.get(type(expr))
        roundings = function_roundings(type(expr))
        inside = self.inside
        special = type(expr) in SPECIAL_FUNCTIONS
        # Its argument held to a rounding, where the formula does not round it itself: a correct
        # kernel may form it as x - max.
        exponential = type(expr) is sympy.exp and not isinstance(expr.args[0], functions.shifted)
        flushes = type(expr) in FLUSHING_FUNCTIONS
        if self.exact:
            def function_of_balls(ctx):
                operands = [a(ctx)[0] for a in arguments]
                if exponential and balls.MODE.linear:  # its argument held to a rounding, as the float64 pass holds it
                    operands = [balls.rounded(operands[0], 1, inside)]
                value = balls.op_rounded(numeric(*operands), roundings, inside)
                value = balls.off_by(value, 0, inside, _function_absolute(expr, ctx))
                if flushes:
                    value = balls.flushed(value, inside)
                # scipy's special functions are some tens of float64 ulps off: the float64 pass's own
                # error, which the exact pass takes into its model too (one rule in both passes).
                return (balls.rounded(value, SCIPY_ROUNDINGS, ratio=ctx.model.float64_ratio) if special
                        else value), 0.0

            return function_of_balls
        if not self.track_errors:
            return lambda ctx: (numeric(*(a(ctx)[0] for a in arguments)), 0.0)
        dummies, derivatives = _partials(type(expr), len(arguments))
        at_arguments = dict(zip(dummies, expr.args))
        # Partials only scale errors, so they need no error bounds of their own (and tanh's
        # derivative holds tanh again). Written in the arguments, cos(x[i]) in sin's partial
        # is shared with the cos(x[i]) of a gradient formula.
        values_only = _Compiler(self.size_names, track_errors=False)
        partials = [values_only.compile(p.xreplace(at_arguments), axes, depth) for p in derivatives]
        # Second order, for one argument: sin(pi * x) at a half-integer x has a zero first
        # derivative, and the rounding of pi * x still moves it by |sin''| * error**2 / 2.
        curvature = (values_only.compile(_second_partial(type(expr)).xreplace(at_arguments), axes, depth)
                     if len(arguments) == 1 else None)

        never_zero = type(expr) in NEVER_ZERO

        def function(ctx):
            values, errors = zip(*(a(ctx) for a in arguments))
            value = numeric(*values)
            error = ctx.op_roundings(roundings, inside) * _wide(value) + _function_absolute(expr, ctx)
            if exponential:  # its argument held to a rounding: a correct kernel may form it as x - max
                error = error + ctx.ratio(inside) * _wide(values[0]) * _wide(value)
            if special:  # scipy's own inaccuracy, in float64's ulps
                error = error + SCIPY_ROUNDINGS * ctx.model.float64_ratio * _wide(value)
            if flushes:
                tiny = ctx.underflows_below(inside)
                error = error + np.where(np.abs(value) < tiny, tiny / ctx.model.u, 0.0)
            if any(np.any(e) for e in errors):
                if nearest_jump is not None:
                    ctx.mark_ambiguous(_too_close(ctx, values[0], nearest_jump(values[0]), errors[0]))
                for partial, e in zip(partials, errors):
                    error = error + _scaled(e, partial(ctx)[0])
                if curvature is not None:
                    error = error + _scaled(np.square(errors[0]) * (ctx.model.u / 2), curvature(ctx)[0])
            return value, ctx.guard(value, error, never_zero and np.equal(value, 0), inside)

        return function

    def _kernel(self, expr, axes, depth):
        """An op's kernel (``functions.kernel``). Where fused, its steps round in the compute
        dtype and its result is stored once in the dtype (where each op stores its own); its
        calibrated errors (``Op.kernel_error``) widen the result. Over magnitudes (``floor``), a
        fused kernel's terms count at its rounding, or at the stored dtype's where it reads its
        op's saved result (whose rounding reaches every term)."""
        op = REGISTRY[expr.op]
        formula = expr.args[0]
        if op.shifts_exponentials:
            formula = _shifted_exponentials(formula)
        if expr.computation not in op.fused:
            return self._kernel_step(op, expr.computation, self.compile(formula, axes, depth), fused=False)
        inner = self._within().compile(formula, axes, depth)
        unfused_in = op.unfused_in.get(expr.computation, ())
        if unfused_in:  # several kernels in those dtypes: the formula's own steps round there
            plain = self._kernel_step(op, expr.computation, self.compile(formula, axes, depth), fused=False)
            fused = self._fused_kernel(op, expr.computation, inner)
            return lambda ctx: (plain if ctx.model.dtype in unfused_in else fused)(ctx)
        return self._fused_kernel(op, expr.computation, inner)

    def _fused_kernel(self, op, computation: str, inner):
        if self.floor:
            reads_saved = op.saves_result and computation != "value"

            def scaled(ctx):
                value, _ = inner(ctx)
                weight = (1.0 if reads_saved else ctx.ratio(True)) / ctx.ratio(False)
                return value * (balls.constant(sympy.Rational(weight)) if self.exact else weight), 0.0

            return scaled
        return self._kernel_step(op, computation, inner, fused=True)

    def _kernel_step(self, op, computation: str, inner, fused: bool):
        """A computation's result: a fused kernel's stored once, several kernels' as their steps
        round (``inner``); its calibrated errors widen it."""
        if self.floor:
            return inner
        kernel_error = op.kernel_error.get(computation)
        if self.exact:
            def kernel_of_balls(ctx):
                value = inner(ctx)[0]
                if balls.MODE.rounding is None and computation != "value":
                    scale = ctx.backward_scale if computation == "backward" else 1.0
                    with np.errstate(all="ignore"):
                        magnitude = np.abs(balls.to_float(np.asarray(value, dtype=object))) * scale
                    if np.any(magnitude > ctx.limit(False)):
                        ctx.overflowed_kernels.add(computation)
                if kernel_error is not None and kernel_error.applies_to(ctx.model.dtype):
                    value = balls.off_by(value, kernel_error.roundings, True, _absolute(kernel_error, ctx),
                                         kernel_error.log_roundings)
                    value = balls.off_by(value, kernel_error.stored_roundings, False, 0.0,
                                         kernel_error.stored_log_roundings)
                return (balls.stored(value) if fused else value), 0.0

            return kernel_of_balls
        if not self.track_errors:
            return inner

        def kernel_step(ctx):
            value, error = inner(ctx)
            if kernel_error is not None and kernel_error.applies_to(ctx.model.dtype):
                error = error + _kernel_error(kernel_error, value, ctx)
            if fused and ctx.model.stores_kernels:
                error = error + np.where(np.asarray(error) > 0, _wide(value), 0.0)
            return value, ctx.guard(value, error)

        return kernel_step

    def _indicator(self, expr, axes, depth):
        condition = self.compile(expr.args[0], axes, depth)
        kind = np.int64 if self.exact else np.float64
        return lambda ctx: (np.asarray(condition(ctx)[0], dtype=bool).astype(kind), 0.0)

    def _precedes(self, expr, axes, depth):
        a_fn, b_fn, m_fn, j_fn, descending = self._args(expr, axes, depth)

        def precedes(ctx):
            (a, a_error), (b, b_error) = a_fn(ctx), b_fn(ctx)
            m, j = self._positions(m_fn(ctx)[0]), self._positions(j_fn(ctx)[0])
            first = bool(descending(ctx)[0])
            if self.exact:
                with balls.ties_settled():  # a tie is settled by position, not a kink
                    ahead = balls.compare(sympy.Gt if first else sympy.Lt, a, b)
                    tie = balls.compare(sympy.Eq, a, b)
            else:
                ahead = np.greater(a, b) if first else np.less(a, b)
                tie = np.equal(a, b)
                self._mark_ambiguous(ctx, _too_close(ctx, a, b, _wide(a_error) + _wide(b_error)) & (m != j))
            result = (m != j) & (ahead | tie & (m < j))
            return result.astype(np.int64 if self.exact else np.float64), 0.0

        return precedes

    def _Heaviside(self, expr, axes, depth):
        argument = self.compile(expr.args[0], axes, depth)
        at_zero = float(expr.args[1]) if len(expr.args) > 1 else 0.5

        def heaviside(ctx):
            value, error = argument(ctx)
            if self.exact:
                return balls.heaviside(value, at_zero), 0.0
            self._mark_ambiguous(ctx, _too_close(ctx, value, 0.0, error))
            return np.heaviside(value, at_zero), 0.0

        return heaviside

    def _Tie(self, expr, axes, depth):
        value_fn, extremum_fn = self._args(expr, axes, depth)

        def tie(ctx):
            (value, error), (extremum, _) = value_fn(ctx), extremum_fn(ctx)
            if self.exact:
                return balls.compare(sympy.Eq, value, extremum).astype(np.int64), 0.0
            self._mark_ambiguous(ctx, _too_close(ctx, value, extremum, _wide(error)) & (value != extremum))
            return np.equal(value, extremum).astype(np.float64), 0.0

        return tie

    def _MinMaxBase(self, expr, axes, depth):
        arguments = self._args(expr, axes, depth)
        pick = np.maximum if isinstance(expr, sympy.Max) else np.minimum
        if self.exact:
            pick = balls.extremum(isinstance(expr, sympy.Max))

        def extremum(ctx):
            values, errors = zip(*(a(ctx) for a in arguments))
            value = pick.reduce(np.broadcast_arrays(*values)) if not self.exact else pick(
                np.stack(np.broadcast_arrays(*(np.asarray(v, dtype=object) for v in values))), 0)
            if self.exact:
                return value, 0.0
            for v, e in zip(values, errors):  # a near tie with another argument could flip in torch
                self._mark_ambiguous(ctx, _too_close(ctx, v, value, e) & (v != value))
            error = np.max(np.broadcast_arrays(*(_wide(e) for e in errors)), axis=0)
            return value, error

        return extremum

    def _positions(self, values) -> np.ndarray:
        """Index values as an int64 array: in the exact pass they may be balls (an argmax). A
        non-integer is an index of a branch not taken (``balls.NOT_AN_INTEGER``)."""
        if self.exact:
            return np.asarray(balls.to_integers(values), dtype=np.int64)
        values = np.asarray(values)
        if values.dtype.kind == "f":
            values = np.where(values == np.round(values), values, balls.NOT_AN_INTEGER)
        return values.astype(np.int64)

    def _KroneckerDelta(self, expr, axes, depth):
        left, right = self._args(expr, axes, depth)
        return lambda ctx: (np.equal(self._positions(left(ctx)[0]), self._positions(right(ctx)[0])).astype(
            np.int64 if self.exact else np.float64), 0.0)

    # -- reductions and conditions -------------------------------------------------------
    def _ExprWithLimits(self, expr, axes, depth):
        """Sum, Product and the extrema: one new axis per index, reduced at once.

        Bounds may depend on outer indices (a cumulative sum runs to the output index): the
        new axis then spans the widest range, and a mask keeps each element's own range.
        """
        reduce, neutral = REDUCTIONS.get(type(expr), (None, None))
        if reduce is None:
            raise UnsupportedFormula(f"no numeric rule for {type(expr).__name__}")
        if self.exact and isinstance(expr, ReducedMax):
            largest = not isinstance(expr, ReducedMin)
            reduce, neutral = balls.extremum(largest), balls.neutral(largest)
        limits = expr.limits
        own = {limit[0] for limit in limits}
        inner_depth = depth + len(limits)
        inner_axes = dict(axes)
        inner_axes.update({index: depth + offset for offset, (index, _, _) in enumerate(limits, start=1)})
        bounds = []
        # Outermost (the last limit) first: an inner limit's bounds may use an outer index,
        # as in Sum(f, (d, 0, k), (k, 0, n - 1)), so they are evaluated on the outer axes.
        for offset in range(len(limits), 0, -1):
            index, low, high = limits[offset - 1]
            used = (low.free_symbols | high.free_symbols) & own
            if used - {limit[0] for limit in limits[offset:]}:
                raise UnsupportedFormula(f"bounds that depend on an inner index of the same reduction: {expr}")
            bound_axes, bound_depth = (inner_axes, inner_depth) if used else (axes, depth)
            bounds.append((index, depth + offset, self.compile(low, bound_axes, bound_depth),
                           self.compile(high, bound_axes, bound_depth)))
        summed = tuple(range(depth + 1, inner_depth + 1))
        kind = type(expr)
        track_errors = self.track_errors
        body = self.compile(expr.function, inner_axes, inner_depth)
        factors = None
        if kind is sympy.Sum and expr.function.is_Mul:
            # A sum of products whose product spans more indices than any factor (A @ B in
            # index notation) goes to einsum, which never forms that product. It sums in another
            # order, so the value differs from the formed sum's by rounding, within its bound;
            # the bound is the formed one's, in sums of products too. In the exact pass, on
            # balls, the products' and the sum's modelled roundings are the formed sum's.
            spans = [_free_symbols(f) & inner_axes.keys() for f in expr.function.args]
            if all(span < set().union(*spans) for span in spans):
                factors = self._args(expr.function, inner_axes, inner_depth)
                product_roundings = max(sum(not _exact_multiplier(f) for f in expr.function.args) - 1, 0)

        within_kernel = self.inside

        def total(ctx):
            inside = True
            for index, axis, low_fn, high_fn in bounds:
                low, high = _pad(np.asarray(low_fn(ctx)[0]), inner_depth), _pad(np.asarray(high_fn(ctx)[0]), inner_depth)
                span = np.arange(int(np.min(low)), int(np.max(high)) + 1).reshape(_axis_shape(axis, inner_depth))
                ctx.indices[index] = span
                inside = inside & (span >= low) & (span <= high)
            if factors is not None and np.all(inside):
                lengths = {axis: ctx.indices[index].size for index, axis, _, _ in bounds}
                if self.exact:
                    return _summed_product_of_balls([f(ctx)[0] for f in factors], lengths, depth, inner_depth,
                                                    within_kernel, product_roundings), 0.0
                if not track_errors:
                    return _summed_product([f(ctx)[0] for f in factors], lengths, depth, inner_depth), 0.0
                bounded = _summed_product_bounded([f(ctx) for f in factors], lengths, depth, inner_depth, ctx,
                                                  within_kernel, product_roundings)
                if bounded is not None:
                    return bounded
            value, error = body(ctx)
            value = self._real(value)
            shape = np.broadcast_shapes(np.shape(_pad(value, inner_depth)), np.shape(inside))
            value = np.broadcast_to(_pad(value, inner_depth), shape)
            if not np.all(inside):  # the index arrays are small: this is cheap
                value = np.where(inside, value, neutral)
            result = reduce(value, axis=summed)
            if self.exact and kind is sympy.Sum:
                terms = np.sum(inside & balls.may_be_nonzero(value), axis=summed)
                return balls.rounded_sum(result, [np.abs(value).sum(axis=summed)], within_kernel,
                                         summation_roundings(terms)), 0.0
            if self.exact and kind is sympy.Product:
                return _partial_products_of_balls(value, np.broadcast_to(inside, shape), summed, within_kernel), 0.0
            if not track_errors:
                return result, 0.0
            error = np.where(inside, np.broadcast_to(_pad(np.asarray(error, dtype=ERROR_DTYPE), inner_depth), shape), 0)
            rounding = ctx.ratio(within_kernel)
            if kind is sympy.Sum:
                magnitude = _wide(value).sum(axis=summed)  # partial sums may reach it, in any order
                # Exact zeros add exactly (a max pool's backward sums one term per window).
                terms = np.sum(inside & ((value != 0) | (error > 0)), axis=summed)
                return result, ctx.guard(magnitude, error.sum(axis=summed) + rounding * summation_roundings(terms) *
                                         magnitude, inside=within_kernel)
            if kind is sympy.Product:
                return result, _partial_products_error(value, error, np.broadcast_to(inside, shape), summed, ctx,
                                                       within_kernel)
            chosen = np.broadcast_to(np.expand_dims(result, summed), shape)
            ties = inside & (value == chosen)
            return result, np.where(ties, error, 0).max(axis=summed)

        return total

    def _Piecewise(self, expr, axes, depth):
        branches = [(self.compile(value, axes, depth), self.compile(cond, axes, depth))
                    for value, cond in expr.args]

        def piecewise(ctx):
            values, errors, conditions = [], [], []
            for value_fn, cond_fn in branches:
                value, error = value_fn(ctx)
                values.append(self._real(value))
                errors.append(np.asarray(error, dtype=ERROR_DTYPE))
                conditions.append(np.asarray(cond_fn(ctx)[0], dtype=bool))
            shape = np.broadcast_shapes(*(np.shape(a) for a in values + errors + conditions))
            conditions = [np.broadcast_to(c, shape) for c in conditions]
            return (np.select(conditions, [np.broadcast_to(v, shape) for v in values], np.nan),
                    np.select(conditions, [np.broadcast_to(e, shape) for e in errors], 0))

        return piecewise

    def _select(self, expr, axes, depth):
        condition, a, b = self._args(expr, axes, depth)

        def selected(ctx):
            (a_value, a_error), (b_value, b_error) = a(ctx), b(ctx)
            chosen = np.asarray(condition(ctx)[0], dtype=bool)
            shape = np.broadcast_shapes(np.shape(chosen), np.shape(a_value), np.shape(b_value))
            value = np.where(chosen, self._real(a_value), self._real(b_value))
            error = np.where(chosen, np.asarray(a_error, dtype=ERROR_DTYPE), np.asarray(b_error, dtype=ERROR_DTYPE))
            return np.broadcast_to(value, shape), np.broadcast_to(error, shape)

        return selected

    def _Relational(self, expr, axes, depth):
        compare = COMPARISONS[type(expr)]
        left, right = self._args(expr, axes, depth)

        def relation(ctx):
            (a, a_error), (b, b_error) = left(ctx), right(ctx)
            if self.exact:
                return balls.compare(type(expr), a, b), 0.0
            self._mark_ambiguous(ctx, _too_close(ctx, a, b, _wide(a_error) + _wide(b_error)))
            return compare(a, b), 0.0

        return relation

    def _And(self, expr, axes, depth):
        parts = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_and.reduce(np.broadcast_arrays(*(p(ctx)[0] for p in parts))), 0.0)

    def _Or(self, expr, axes, depth):
        parts = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_or.reduce(np.broadcast_arrays(*(p(ctx)[0] for p in parts))), 0.0)

    def _Not(self, expr, axes, depth):
        (part,) = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_not(part(ctx)[0]), 0.0)


# A plan compiles each formula twice (with and without error arithmetic), and formulas share
# subexpressions; sympy walks the whole subtree on every call of free_symbols and xreplace.
@functools.lru_cache(maxsize=2**14)
def _free_symbols(expr) -> frozenset:
    return frozenset(expr.free_symbols)


@functools.lru_cache(maxsize=2**14)
def _canonical(expr, placed: tuple):
    """``expr`` with each free index named by the axis it sits on."""
    return expr.xreplace({s: sympy.Symbol(f"axis {a}", integer=True) for s, a in placed})


@cache
def _second_partial(function_class):
    """sympy's second derivative of a one-argument function, in the dummy of ``_partials``."""
    (dummy,), (first,) = _partials(function_class, 1)
    second = sympy.diff(first, dummy)
    return sympy.Integer(0) if second.has(sympy.Derivative) else second


@cache
def _partials(function_class, arity: int) -> tuple:
    """Dummy arguments of ``function_class`` and sympy's partial derivatives in them."""
    dummies = tuple(sympy.Dummy(f"a{k}", real=True) for k in range(arity))
    applied = function_class(*dummies)
    partials = [sympy.diff(applied, d) for d in dummies]
    # An argument sympy cannot differentiate in (polygamma's order) is an exact integer.
    return dummies, tuple(sympy.Integer(0) if p.has(sympy.Derivative) else p for p in partials)
