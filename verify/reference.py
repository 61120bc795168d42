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
from .tolerance import UNIT_ROUNDOFF, allowed_error

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
    # Derivatives of jumps: torch's backward of sign, heaviside and comparisons is 0.
    sympy.DiracDelta: lambda *args: np.zeros_like(np.asarray(args[0], dtype=np.float64)),
}
# Special functions come from scipy, in float64 only, and are accurate to some tens of ulps
# (scipy's erfc is 40 ulps off at 8.3); torch's own are too (its float32 digamma is 45 ulps
# off at 1.5625). Their error bounds include both.
SPECIAL_FUNCTIONS = {
    sympy.erf: scipy.special.erf, sympy.erfc: scipy.special.erfc, sympy.loggamma: scipy.special.gammaln,
    sympy.polygamma: lambda order, x: scipy.special.polygamma(np.asarray(order, dtype=np.int64), x),
}
SPECIAL_FUNCTION_ULPS = 64

NUMPY_FUNCTIONS.update(SPECIAL_FUNCTIONS)
# Functions that are never 0: a computed 0 is an underflow, where torch's order of operations
# (exp(x - max) in logsumexp) may keep precision the formula lost.
NEVER_ZERO = {sympy.exp, sympy.erfc, sympy.cosh}
# Functions that jump, each with the jump nearest its argument: a point whose argument,
# carrying rounding error, is that close to a jump is ambiguous.
JUMPS = {sympy.sign: lambda a: 0.0, functions.round_half_even: lambda a: np.floor(a) + 0.5,
         functions.floor_real: np.round, functions.ceil_real: np.round, functions.trunc_real: np.round}
COMPARISONS = {sympy.Lt: np.less, sympy.Le: np.less_equal, sympy.Gt: np.greater,
               sympy.Ge: np.greater_equal, sympy.Eq: np.equal, sympy.Ne: np.not_equal}
REDUCTIONS = {sympy.Sum: (np.sum, 0.0), sympy.Product: (np.prod, 1.0),
              ReducedMax: (np.max, -np.inf), ReducedMin: (np.min, np.inf)}


class UnsupportedFormula(Exception):
    """A formula holds something the compiler has no numeric rule for."""


@dataclass
class Context:
    """What one evaluation sees: variable arrays (value, error), sizes and bound indices.

    ``dtype`` is the dtype torch computes in, which decides when a comparison is too close
    to call; ``ambiguous`` collects the points where one was.
    """

    env: dict
    sizes: dict
    batch: int
    dtype: torch.dtype = torch.float64
    indices: dict = field(default_factory=dict)  # index symbol -> integer array
    ambiguous: np.ndarray = None
    shared: dict = field(default_factory=dict)  # subexpression key -> (value, error), see _Compiler
    shared_bytes: int = 0

    def __post_init__(self):
        if self.ambiguous is None:
            self.ambiguous = np.zeros(self.batch, dtype=bool)
        # Narrower dtypes overflow in steps where float64 does not (pi * x in sinc at 1e38 in
        # float32): such a step makes the error bound infinite, and the exact pass decides.
        self.step_limit = float(torch.finfo(self.dtype).max) if self.dtype != torch.float64 else np.inf
        self.step_tiny = float(torch.finfo(self.dtype).tiny)
        # An underflowed step is off by up to the smallest normal number, absolutely: in units of u.
        self.underflow_error = self.step_tiny / UNIT_ROUNDOFF[self.dtype]

    def guard(self, value, error, vanished=False):
        """The error bound, made infinite where a step's value overflows the dtype under test
        (float64 overflows to inf by itself), and at least the smallest normal number where
        it underflows (into subnormal numbers, or to zero where ``vanished`` says a product of
        nonzero factors became 0): there torch keeps only absolute precision."""
        magnitude = np.abs(value)
        underflow = ((magnitude < self.step_tiny) & (magnitude > 0)) | vanished
        if np.any(underflow):
            error = np.where(underflow, np.maximum(error, self.underflow_error), error)
        if not np.isinf(self.step_limit) and np.any(magnitude > self.step_limit):
            error = np.where(magnitude > self.step_limit, np.inf, error)
        return error

    def mark_ambiguous(self, close):
        close = np.asarray(close, dtype=bool)
        if close.ndim:
            self.ambiguous |= np.broadcast_to(close.reshape(close.shape[0], -1).any(axis=1), self.ambiguous.shape)


class Reference:
    """One compiled formula: ``reference(ctx)`` gives (value, error bound), shape (batch, *dims).

    ``reference.estimate(ctx)`` gives the same value without the error arithmetic, beside a
    floor of the error bound: the a priori bound where the formula has one, else 0.
    """

    def __init__(self, tensor: Tensor, size_names: frozenset, a_priori: bool = False):
        self.tensor = tensor
        self.axes = {index: axis + 1 for axis, index in enumerate(tensor.indices)}
        depth = len(tensor.indices)
        self._compiled = _Compiler(size_names).compile(tensor.expr, self.axes, depth)
        values_only = _Compiler(size_names, track_errors=False)
        self._value = values_only.compile(tensor.expr, self.axes, depth)
        self._magnitude = values_only.compile(_magnitude(tensor.expr), self.axes, depth) if a_priori else None
        self._size_names = size_names
        self._exact = None  # compiled on first use: most formulas never need the exact pass

    def exact(self, ctx: Context) -> tuple:
        """(value, a priori error bound) as object arrays of balls, shape (batch, *dims), in a
        context whose variables are balls (``verify.exact``). The bound is the formula taken
        over the magnitudes of its terms: what computing each term to a relative rounding may
        be off by."""
        if self._exact is None:
            exact = _Compiler(self._size_names, exact=True)
            depth = len(self.tensor.indices)
            self._exact = (exact.compile(self.tensor.expr, self.axes, depth),
                           exact.compile(_magnitude(self.tensor.expr), self.axes, depth))
        full = self._bind(ctx)
        value, magnitude = (np.broadcast_to(np.asarray(f(ctx)[0], dtype=object), full) for f in self._exact)
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
        full = self._bind(ctx)
        with np.errstate(all="ignore"):
            value = np.array(np.broadcast_to(self._value(ctx)[0], full), dtype=np.float64)
        magnitude = self._floor(ctx, full)
        # An undefined magnitude gives no floor; an infinite one stays infinite (the point is left to the bounds).
        return value, np.zeros(full, dtype=ERROR_DTYPE) if magnitude is None else np.nan_to_num(
            magnitude, nan=0.0, posinf=np.inf)

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
            return np.broadcast_to(np.asarray(self._magnitude(ctx)[0], dtype=ERROR_DTYPE), full)


def _magnitude(expr):
    """``expr`` with every sum and product taken over the magnitudes of its terms.

    The running bound follows sympy's form of a derivative, and torch computes an equal form
    in another order: var's JVP is sum(t * (A - mean(A))) in torch and
    sum((A - mean(A)) * (t - mean(t))) in sympy. At a constant A and t both of sympy's factors
    are exactly 0, so its bound is 0, while torch rounds mean(A) and keeps u * |t| * |A|.
    Evaluated over magnitudes, the a priori bound of any order of the same terms, the
    formula gives the floor of such a bound.
    """
    if expr.is_Add or expr.is_Mul:
        return type(expr)(*(_magnitude(a) for a in expr.args))
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        return _magnitude(expr.base) ** expr.exp
    if isinstance(expr, sympy.Sum):
        return sympy.Sum(_magnitude(expr.function), *expr.limits)
    return sympy.Abs(expr)


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


def _summed_product_of_balls(factors: list, lengths: dict, depth: int, inner_depth: int):
    """``_summed_product`` on balls, widened as the formed sum is in the modelled mode: each
    product by its roundings (``balls.rounded``), then the sum by one rounding of the sum of
    the products' magnitudes (``balls.rounded_sum``)."""
    total = _summed_product(factors, lengths, depth, inner_depth, dtype=object)
    if balls.MODE.rounding is None:
        return total
    magnitude = _summed_product([np.abs(np.asarray(f, dtype=object)) for f in factors], lengths, depth, inner_depth,
                                dtype=object)
    products = balls.rounded(magnitude, len(factors) - 1)  # the terms' magnitudes, each product rounded
    return balls.rounded_sum(total + (products - magnitude), [products])


def _summed_product_bounded(factors: list, lengths: dict, depth: int, inner_depth: int, ctx) -> tuple | None:
    """(value, error bound) of ``_summed_product`` of the factors' (value, error) pairs, the
    bound being what ``_Mul`` and the Sum give the formed product, each of its terms a sum of
    products itself: (k - 1) |product| for the product's roundings, each factor's error times
    the other factors' magnitudes, the second-order term of each pair of erring factors, then
    the sum's own rounding. None where a term might overflow or underflow the dtype, which
    the formed product's guard judges term by term."""
    values = [np.asarray(value, dtype=np.float64) for value, _ in factors]
    errors = [np.asarray(error, dtype=ERROR_DTYPE) for _, error in factors]
    magnitudes = [_wide(value) for value in values]
    with np.errstate(all="ignore"):
        largest = math.prod(float(np.max(m, initial=0.0)) for m in magnitudes)
        smallest = math.prod(float(np.min(m, where=m > 0, initial=np.inf)) for m in magnitudes)
    if not largest <= ctx.step_limit or smallest < ctx.step_tiny:
        return None

    def summed(arrays):
        return _summed_product(arrays, lengths, depth, inner_depth)

    magnitude = summed(magnitudes)
    error = (len(values) - 1) * magnitude
    carrying = [k for k, e in enumerate(errors) if np.any(e)]
    for k in carrying:
        error = error + summed([errors[k] if j == k else m for j, m in enumerate(magnitudes)])
    for a, b in itertools.combinations(carrying, 2):
        error = error + UNIT_ROUNDOFF[ctx.dtype] * summed(
            [errors[j] if j in (a, b) else m for j, m in enumerate(magnitudes)])
    # 0 * inf in a term: an exact zero through an overflowed step, or a lost step through a
    # zero. The formed product tells them apart; here the bound is given up (inf).
    error = np.where(np.isnan(error), np.inf, error)
    return summed(values), ctx.guard(magnitude, error + magnitude)


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
    scale = np.maximum(np.abs(left), np.abs(right))
    return (np.abs(np.asarray(left) - np.asarray(right)) <= allowed_error(scale, error, ctx.dtype)) & (error > 0)


# (subtree, depth, error arithmetic, exact, size names, its free indices' axes) -> its compiled function
_COMPILED = {}
COMPILED_ENTRIES = 2**16


class _Compiler:
    """One method per sympy class, found along the class's MRO as sympy's printers do."""

    def __init__(self, size_names: frozenset, track_errors: bool = True, exact: bool = False):
        self.size_names = size_names
        self.track_errors = track_errors and not exact
        # On object arrays of arb balls (verify.balls), values only: the exact pass.
        self.exact = exact

    def _real(self, array):
        """An array of reals: float64, or as it is (balls) in the exact pass."""
        return np.asarray(array, dtype=object if self.exact else np.float64)

    def compile(self, expr, axes: dict, depth: int):
        # Formulas hold the same subtree many times over (a softmax of a softmax holds its
        # input in every term): compiled once, the walk is linear in the distinct subtrees.
        key = (expr, depth, self.track_errors, self.exact, self.size_names,
               tuple(sorted((s.name, axes[s]) for s in _free_symbols(expr) if s in axes)))
        compiled = _COMPILED.get(key)
        if compiled is None:
            if len(_COMPILED) > COMPILED_ENTRIES:
                _COMPILED.clear()
            compiled = _COMPILED[key] = self._compiled(expr, axes, depth)
        return compiled

    def _compiled(self, expr, axes: dict, depth: int):
        if self.track_errors and expr.is_integer and not expr.has(sympy.Indexed):
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

        def shared(ctx):
            spans = tuple((int(ctx.indices[s].flat[0]), ctx.indices[s].size) for s in indices)
            key = (static, spans, track_errors, self.exact)
            found = ctx.shared.get(key)
            if found is None and not track_errors:  # a value with its error bound serves too
                found = ctx.shared.get((static, spans, True, self.exact))
            if found is not None:
                return found
            result = compiled(ctx)
            size = sum(np.asarray(part).nbytes for part in result)
            if ctx.shared_bytes + size <= SHARED_BYTES:
                ctx.shared[key] = result
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
        if self.exact:  # built at evaluation time, in the precision of the moment
            return lambda ctx: (balls.constant(expr), 0.0)
        value = float(expr)
        error = 0.0 if expr.is_Integer and abs(value) < 2**53 else abs(value)
        return lambda ctx: (value, error)

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
        if self.exact:
            def add_balls(ctx):
                values = [t(ctx)[0] for t in terms]
                return balls.rounded_sum(sum(values), values), 0.0

            return add_balls
        if not self.track_errors:
            return lambda ctx: (sum(t(ctx)[0] for t in terms), 0.0)

        def add(ctx):
            values, errors = zip(*(t(ctx) for t in terms))
            # Summing k terms rounds k - 1 times, each time by at most the sum of magnitudes.
            value = sum(values)
            return value, ctx.guard(value, sum(errors) + (len(values) - 1) * sum(_wide(v) for v in values))

        return add

    def _Mul(self, expr, axes, depth):
        factors = self._args(expr, axes, depth)
        if self.exact:
            return lambda ctx: (balls.rounded(_product([f(ctx)[0] for f in factors]), len(factors) - 1), 0.0)
        if not self.track_errors:
            return lambda ctx: (_product([f(ctx)[0] for f in factors]), 0.0)

        def mul(ctx):
            values, errors = zip(*(f(ctx) for f in factors))
            product = _product(values)
            magnitudes = [_wide(v) for v in values]
            carrying = [k for k, e in enumerate(errors) if np.any(e)]
            error = (len(values) - 1) * _wide(product)
            for k in carrying:
                error = _plus(error, _scaled(errors[k], _product_except(magnitudes, (k,))))
            for a, b in itertools.combinations(carrying, 2):
                # Second order: two factors that both carry error, near zero both (e.g. cancelled).
                error = _plus(error, _scaled(np.multiply(errors[a], errors[b]) * UNIT_ROUNDOFF[ctx.dtype],
                                             _product_except(magnitudes, (a, b))))
            vanished = np.equal(product, 0)
            for v in values:
                vanished = vanished & np.not_equal(v, 0)
            return product, ctx.guard(product, error, vanished)

        return mul

    def _Pow(self, expr, axes, depth):
        base, exponent = self._args(expr, axes, depth)
        if self.exact:
            return lambda ctx: (balls.rounded(balls.power(base(ctx)[0], exponent(ctx)[0])), 0.0)
        if not self.track_errors:
            return lambda ctx: (np.power(np.asarray(base(ctx)[0], dtype=np.float64), exponent(ctx)[0]), 0.0)

        def power(ctx):
            (b, b_error), (p, p_error) = base(ctx), exponent(ctx)
            b = np.asarray(b, dtype=np.float64)
            value = np.power(b, p)
            wide_base = np.asarray(b, dtype=ERROR_DTYPE)
            error = _wide(value) + _scaled(b_error, p * np.power(wide_base, np.asarray(p, dtype=ERROR_DTYPE) - 1))
            if np.any(b_error) and np.all(np.asarray(p) > 1):
                # Second order: a base that is a computed zero still has |error|**p of room.
                u = UNIT_ROUNDOFF[ctx.dtype]
                error = error + np.power(_wide(b_error) * u, np.asarray(p, dtype=ERROR_DTYPE)) / u
            if np.any(p_error):
                error = error + _scaled(p_error, value * np.log(np.abs(wide_base)))
            return value, ctx.guard(value, error, np.equal(value, 0) & np.not_equal(b, 0))

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
        numeric = (balls.FUNCTIONS if self.exact else NUMPY_FUNCTIONS).get(type(expr))
        if numeric is None:
            raise UnsupportedFormula(f"no numeric rule for the function {type(expr).__name__}")
        arguments = self._args(expr, axes, depth)
        nearest_jump = JUMPS.get(type(expr))
        if self.exact:  # scipy's and torch's special functions are some tens of ulps off
            roundings = SPECIAL_FUNCTION_ULPS if type(expr) in SPECIAL_FUNCTIONS else 1
            return lambda ctx: (balls.rounded(numeric(*(a(ctx)[0] for a in arguments)), roundings), 0.0)
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

        special = type(expr) in SPECIAL_FUNCTIONS
        never_zero = type(expr) in NEVER_ZERO

        def function(ctx):
            values, errors = zip(*(a(ctx) for a in arguments))
            value = numeric(*values)
            error = _wide(value)
            if special:  # scipy's inaccuracy in float64 ulps, and torch's own in ulps of its dtype
                error = error * (1 + SPECIAL_FUNCTION_ULPS * (1 + UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[ctx.dtype]))
            if any(np.any(e) for e in errors):
                if nearest_jump is not None:
                    ctx.mark_ambiguous(_too_close(ctx, values[0], nearest_jump(values[0]), errors[0]))
                for partial, e in zip(partials, errors):
                    error = error + _scaled(e, partial(ctx)[0])
                if curvature is not None:
                    error = error + _scaled(np.square(errors[0]) * (UNIT_ROUNDOFF[ctx.dtype] / 2), curvature(ctx)[0])
            return value, ctx.guard(value, error, vanished=never_zero and np.equal(value, 0))

        return function

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
        """Index values as an int64 array: in the exact pass they may be balls (an argmax)."""
        return np.asarray(balls.to_integers(values) if self.exact else values, dtype=np.int64)

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
                    return _summed_product_of_balls([f(ctx)[0] for f in factors], lengths, depth, inner_depth), 0.0
                if not track_errors:
                    return _summed_product([f(ctx)[0] for f in factors], lengths, depth, inner_depth), 0.0
                bounded = _summed_product_bounded([f(ctx) for f in factors], lengths, depth, inner_depth, ctx)
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
                return balls.rounded_sum(result, [np.abs(value).sum(axis=summed)]), 0.0
            if self.exact and kind is sympy.Product:
                return balls.rounded(result, np.sum(np.broadcast_to(inside, shape), axis=summed)), 0.0
            if not track_errors:
                return result, 0.0
            error = np.where(inside, np.broadcast_to(_pad(np.asarray(error, dtype=ERROR_DTYPE), inner_depth), shape), 0)
            if kind is sympy.Sum:
                magnitude = _wide(value).sum(axis=summed)  # partial sums may reach it, in any order
                return result, ctx.guard(magnitude, error.sum(axis=summed) + magnitude)
            if kind is sympy.Product:
                magnitudes = _wide(value)
                exact = magnitudes.prod(axis=summed)
                count = np.sum(np.broadcast_to(inside, shape), axis=summed)
                vanished = np.equal(result, 0) & np.all(np.not_equal(value, 0), axis=summed)
                return result, ctx.guard(result, (magnitudes + error).prod(axis=summed) - exact + count * exact, vanished)
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
