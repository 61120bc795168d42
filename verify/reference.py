"""Sympy formulas -> vectorized numpy functions that also bound their own rounding error.

A formula in index notation compiles once into a tree of closures. Evaluation is
vectorized over a batch of points and over every index: a free index becomes an array
axis, a ``Sum`` becomes a reduction over a new axis, ``Indexed`` becomes fancy indexing.
Nothing runs per element in Python.

Beside each value the closures carry a running bound on the rounding error of computing
that value in floating point, in units of the unit roundoff ``u`` (first-order forward
error analysis: every operation adds ``|result|``, and each argument's error is scaled by
the magnitude of the partial derivative with respect to it). Bounds are kept in
``np.longdouble``, whose wider exponent keeps them finite where a float64 result sits near
overflow (1/x at the smallest normal float64). ``verify.tolerance`` turns
that bound into the tolerance of a comparison, so points where the formula is sensitive
(large terms that cancel, ``exp`` of a large argument) get room, and benign points stay tight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import sympy
from sympy.core.relational import Relational

from .lower.sympy import Tensor

# Numeric twins of the sympy functions that formulas and their derivatives contain.
NUMPY_FUNCTIONS = {
    sympy.exp: np.exp, sympy.log: np.log, sympy.sin: np.sin, sympy.cos: np.cos, sympy.tan: np.tan,
    sympy.sinh: np.sinh, sympy.cosh: np.cosh, sympy.tanh: np.tanh, sympy.Abs: np.abs, sympy.sign: np.sign,
}
ERROR_DTYPE = np.longdouble
COMPARISONS = {sympy.Lt: np.less, sympy.Le: np.less_equal, sympy.Gt: np.greater,
               sympy.Ge: np.greater_equal, sympy.Eq: np.equal, sympy.Ne: np.not_equal}


class UnsupportedFormula(Exception):
    """A formula holds something the compiler has no numeric rule for."""


@dataclass
class Context:
    """What one evaluation sees: variable arrays (value, error), sizes and bound indices."""

    env: dict
    sizes: dict
    batch: int
    indices: dict = field(default_factory=dict)  # index symbol -> integer array
    bound: dict = field(default_factory=dict)  # dummy argument -> array, for partial derivatives


class Reference:
    """One compiled formula: ``reference(ctx)`` gives (value, error bound), shape (batch, *dims)."""

    def __init__(self, tensor: Tensor, size_names: frozenset):
        self.tensor = tensor
        self.axes = {index: axis + 1 for axis, index in enumerate(tensor.indices)}
        self._compiled = _Compiler(size_names).compile(tensor.expr, self.axes, depth=len(tensor.indices))

    def __call__(self, ctx: Context) -> tuple:
        shape = tuple(_size(d, ctx.sizes) for d in self.tensor.shape)
        for index, axis in self.axes.items():
            ctx.indices[index] = np.arange(shape[axis - 1]).reshape(_axis_shape(axis, len(shape)))
        with np.errstate(all="ignore"):
            value, error = self._compiled(ctx)
        full = (ctx.batch, *shape)
        return np.broadcast_to(value, full).astype(np.float64), np.broadcast_to(error, full).astype(ERROR_DTYPE)


def _size(dim, sizes) -> int:
    return dim if isinstance(dim, int) else int(sizes[dim.name])


def _axis_shape(axis: int, depth: int) -> tuple:
    shape = [1] * (depth + 1)
    shape[axis] = -1
    return tuple(shape)


def _wide(array):
    return np.abs(np.asarray(array, dtype=ERROR_DTYPE))


def _scaled(error, factor):
    """``error * |factor|``, where an exact operand (error 0) stays exact even if factor is inf."""
    return np.where(np.equal(error, 0), 0.0, error * np.abs(factor))


def _pad(array, depth: int):
    """Give an array depth + 1 axes by adding trailing ones, so that broadcasting aligns axes."""
    if not isinstance(array, np.ndarray):
        return array
    return array.reshape(array.shape + (1,) * (depth + 1 - array.ndim))


class _Compiler:
    """One method per sympy class, found along the class's MRO as sympy's printers do."""

    def __init__(self, size_names: frozenset, track_errors: bool = True):
        self.size_names = size_names
        self.track_errors = track_errors

    def compile(self, expr, axes: dict, depth: int):
        for cls in type(expr).__mro__:
            method = getattr(self, "_" + cls.__name__, None)
            if method is not None:
                return method(expr, axes, depth)
        raise UnsupportedFormula(f"no numeric rule for {type(expr).__name__} in {expr}")

    def _args(self, expr, axes, depth):
        return [self.compile(a, axes, depth) for a in expr.args]

    # -- leaves --------------------------------------------------------------------------
    def _Number(self, expr, axes, depth):
        value = float(expr)
        error = 0.0 if expr.is_Integer and abs(value) < 2**53 else abs(value)
        return lambda ctx: (value, error)

    _NumberSymbol = _Number

    def _BooleanTrue(self, expr, axes, depth):
        return lambda ctx: (True, 0.0)

    def _BooleanFalse(self, expr, axes, depth):
        return lambda ctx: (False, 0.0)

    def _Symbol(self, expr, axes, depth):
        if expr.name in self.size_names:
            return lambda ctx: (ctx.sizes[expr.name], 0.0)
        if expr.is_integer:  # an index, bound by the output axes or by an enclosing Sum
            return lambda ctx: (_pad(ctx.indices[expr], depth), 0.0)

        def variable(ctx):
            if expr in ctx.bound:
                return ctx.bound[expr], 0.0
            value, error = ctx.env[expr.name]
            shape = (ctx.batch,) + (1,) * depth
            return value.reshape(shape), error.reshape(shape)

        return variable

    def _Indexed(self, expr, axes, depth):
        name = expr.base.name
        positions = [self.compile(i, axes, depth) for i in expr.indices]

        def indexed(ctx):
            value, error = ctx.env[name]
            where = (np.arange(ctx.batch).reshape((ctx.batch,) + (1,) * depth),)
            where += tuple(np.asarray(p(ctx)[0], dtype=np.int64) for p in positions)
            return value[where], error[where]

        return indexed

    # -- arithmetic ----------------------------------------------------------------------
    def _Add(self, expr, axes, depth):
        terms = self._args(expr, axes, depth)

        def add(ctx):
            values, errors = zip(*(t(ctx) for t in terms))
            # Summing k terms rounds k - 1 times, each time by at most the sum of magnitudes.
            return sum(values), sum(errors) + (len(values) - 1) * sum(_wide(v) for v in values)

        return add

    def _Mul(self, expr, axes, depth):
        factors = self._args(expr, axes, depth)

        def mul(ctx):
            values, errors = zip(*(f(ctx) for f in factors))
            product = np.prod(np.broadcast_arrays(*values), axis=0) if len(values) > 1 else values[0]
            error = (len(values) - 1) * _wide(product)
            for k, e in enumerate(errors):
                if np.any(e):
                    others = [v for j, v in enumerate(values) if j != k]
                    error = error + _scaled(e, np.prod(np.broadcast_arrays(*map(_wide, others)), axis=0))
            return product, error

        return mul

    def _Pow(self, expr, axes, depth):
        base, exponent = self._args(expr, axes, depth)

        def power(ctx):
            (b, b_error), (p, p_error) = base(ctx), exponent(ctx)
            b = np.asarray(b, dtype=np.float64)
            value = np.power(b, p)
            wide_base = np.asarray(b, dtype=ERROR_DTYPE)
            error = _wide(value) + _scaled(b_error, p * np.power(wide_base, np.asarray(p, dtype=ERROR_DTYPE) - 1))
            if np.any(p_error):
                error = error + _scaled(p_error, value * np.log(np.abs(wide_base)))
            return value, error

        return power

    def _Function(self, expr, axes, depth):
        numeric = NUMPY_FUNCTIONS.get(type(expr))
        if numeric is None:
            raise UnsupportedFormula(f"no numeric rule for the function {type(expr).__name__}")
        arguments = self._args(expr, axes, depth)
        if not self.track_errors:
            return lambda ctx: (numeric(*(a(ctx)[0] for a in arguments)), 0.0)
        dummies, derivatives = _partials(type(expr), len(arguments))
        # Partials only scale errors, so they need no error bounds of their own (and tanh's
        # derivative holds tanh again).
        values_only = _Compiler(self.size_names, track_errors=False)
        partials = [values_only.compile(p, {}, depth) for p in derivatives]

        def function(ctx):
            values, errors = zip(*(a(ctx) for a in arguments))
            value = numeric(*values)
            error = _wide(value)
            if any(np.any(e) for e in errors):
                ctx.bound.update(zip(dummies, (np.asarray(v, dtype=ERROR_DTYPE) for v in values)))
                for partial, e in zip(partials, errors):
                    error = error + _scaled(e, partial(ctx)[0])
            return value, error

        return function

    def _KroneckerDelta(self, expr, axes, depth):
        left, right = self._args(expr, axes, depth)
        return lambda ctx: (np.equal(left(ctx)[0], right(ctx)[0]).astype(np.float64), 0.0)

    # -- sums and conditions -------------------------------------------------------------
    def _Sum(self, expr, axes, depth):
        # One new axis per summation index; all of them are reduced at once.
        limits = expr.limits
        inner_axes = dict(axes)
        bounds = []
        for offset, (index, low, high) in enumerate(limits, start=1):
            if (low.free_symbols | high.free_symbols) & (set(axes) | {limit[0] for limit in limits}):
                raise UnsupportedFormula(f"a sum whose bounds depend on an index is not supported: {expr}")
            inner_axes[index] = depth + offset
            bounds.append((index, depth + offset, self.compile(low, axes, depth), self.compile(high, axes, depth)))
        inner_depth = depth + len(limits)
        body = self.compile(expr.function, inner_axes, inner_depth)
        summed = tuple(range(depth + 1, inner_depth + 1))

        def total(ctx):
            counts = []
            for index, axis, low_fn, high_fn in bounds:
                first, last = int(low_fn(ctx)[0]), int(high_fn(ctx)[0])
                ctx.indices[index] = np.arange(first, last + 1).reshape(_axis_shape(axis, inner_depth))
                counts.append(max(last - first + 1, 0))
            value, error = body(ctx)
            value = _pad(np.asarray(value, dtype=np.float64), inner_depth)
            error = _pad(np.asarray(error, dtype=ERROR_DTYPE), inner_depth)
            # A body that does not vary along a summed axis is broadcast before summing.
            shape = value.shape[: depth + 1] + tuple(counts)
            value, error = np.broadcast_to(value, np.broadcast_shapes(value.shape, shape)), error
            error = np.broadcast_to(error, value.shape)
            return value.sum(axis=summed), error.sum(axis=summed) + _wide(value).sum(axis=summed)

        return total

    def _Piecewise(self, expr, axes, depth):
        branches = [(self.compile(value, axes, depth), self.compile(cond, axes, depth))
                    for value, cond in expr.args]

        def piecewise(ctx):
            values, errors, conditions = [], [], []
            for value_fn, cond_fn in branches:
                value, error = value_fn(ctx)
                values.append(value)
                errors.append(error)
                conditions.append(np.asarray(cond_fn(ctx)[0], dtype=bool))
            shape = np.broadcast_shapes(*(np.shape(a) for a in values + errors + conditions))
            conditions = [np.broadcast_to(c, shape) for c in conditions]
            return (np.select(conditions, [np.broadcast_to(v, shape) for v in values], np.nan),
                    np.select(conditions, [np.broadcast_to(e, shape) for e in errors], np.nan))

        return piecewise

    def _Relational(self, expr, axes, depth):
        compare = COMPARISONS[type(expr)]
        left, right = self._args(expr, axes, depth)
        return lambda ctx: (compare(left(ctx)[0], right(ctx)[0]), 0.0)

    def _And(self, expr, axes, depth):
        parts = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_and.reduce([p(ctx)[0] for p in parts]), 0.0)

    def _Or(self, expr, axes, depth):
        parts = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_or.reduce([p(ctx)[0] for p in parts]), 0.0)

    def _Not(self, expr, axes, depth):
        (part,) = self._args(expr, axes, depth)
        return lambda ctx: (np.logical_not(part(ctx)[0]), 0.0)


@lru_cache(maxsize=None)
def _partials(function_class, arity: int) -> tuple:
    """Dummy arguments of ``function_class`` and sympy's partial derivatives in them."""
    dummies = tuple(sympy.Dummy(f"a{k}", real=True) for k in range(arity))
    applied = function_class(*dummies)
    return dummies, tuple(sympy.diff(applied, d) for d in dummies)
