"""A formula's value at one concrete size and pseudo-random point, in 30-digit mpmath.

It decides whether two forms of a formula agree (sympy's summed form against its raw
derivative), so it walks the sympy tree itself: sums and products become loops, and no
sympy expression is built per term, which would cost seconds on attention's gradients.
"""

from __future__ import annotations

import zlib

import mpmath
import sympy

from .functions import power

DIGITS = 30


class Unsupported(Exception):
    """A node the sampler does not evaluate; the caller trusts neither form's agreement."""


def sample_value(expr: sympy.Expr, bound: dict) -> mpmath.mpf:
    """``expr`` with ``bound`` (symbol -> int) fixed, every real array element or symbol set to
    a value from a fixed hash of its name, and every integer one (a label, an index) to 1."""
    with mpmath.workdps(DIGITS):
        return _Sampler(bound).value(expr)


def _hashed(name: str) -> mpmath.mpf:
    # str's own hash changes per process; crc32 does not, so runs repeat.
    return mpmath.mpf(zlib.crc32(name.encode()) % 997 + 1) / 499


# Functions mpmath evaluates directly; others go through sympy's evalf, which is slower (seconds
# for a power of large exact rationals).
MPMATH = {sympy.exp: mpmath.exp, sympy.log: mpmath.log, sympy.sin: mpmath.sin, sympy.cos: mpmath.cos,
          sympy.tan: mpmath.tan, sympy.tanh: mpmath.tanh, sympy.sinh: mpmath.sinh, sympy.cosh: mpmath.cosh,
          sympy.atan: mpmath.atan, sympy.asin: mpmath.asin, sympy.acos: mpmath.acos, sympy.erf: mpmath.erf,
          sympy.Abs: abs, power: mpmath.power}


class _Sampler:
    def __init__(self, bound: dict):
        self.bound = dict(bound)
        self.free = {}  # expr -> its free symbols
        self.memo = {}  # (sum or function, the values of its free symbols) -> value

    def value(self, expr):
        if expr in self.bound:
            return self.bound[expr]
        if isinstance(expr, (sympy.Sum, sympy.Product, sympy.Function)):
            if expr not in self.free:
                self.free[expr] = tuple(expr.free_symbols)
            key = (expr, tuple(self.bound.get(s) for s in self.free[expr]))
            if key not in self.memo:
                self.memo[key] = self._evaluated(expr)
            return self.memo[key]
        return self._evaluated(expr)

    def _evaluated(self, expr):
        if expr.is_Number or expr.is_NumberSymbol:
            return mpmath.mpf(expr.evalf(DIGITS)) if not expr.is_Integer else int(expr)
        if expr is sympy.true or expr is sympy.false:
            return bool(expr)
        for cls in type(expr).__mro__:
            method = getattr(self, "_" + cls.__name__, None)
            if method is not None:
                return method(expr)
        raise Unsupported(type(expr).__name__)

    def _integer(self, expr) -> int:
        value = self.value(expr)
        if int(value) != value:
            raise Unsupported(f"a non-integer index {expr}")
        return int(value)

    def _Symbol(self, expr):
        return 1 if expr.is_integer else _hashed(expr.name)

    def _Indexed(self, expr):
        if expr.is_integer:
            return 1
        return _hashed(f"{expr.base}[{', '.join(str(self._integer(i)) for i in expr.indices)}]")

    def _Add(self, expr):
        return sum((self.value(a) for a in expr.args), start=0)

    def _Mul(self, expr):
        result = 1
        for factor in expr.args:
            result *= self.value(factor)
        return result

    def _Pow(self, expr):
        base, exponent = self.value(expr.base), self.value(expr.exp)
        if isinstance(exponent, int) and isinstance(base, int) and exponent < 0:
            return mpmath.mpf(base) ** exponent
        return base ** exponent

    def _terms(self, expr):
        """The body's value at each combination of the limits, outermost limit last. An index
        that a Kronecker delta factor of a sum's body pins to another expression takes only
        that value: a sum over a million elements of delta(k, i) * f(k) is one term."""
        pinned = _pinned(expr) if isinstance(expr, sympy.Sum) else {}

        def walk(limits):
            if not limits:
                yield self.value(expr.function)
                return
            *inner, (index, low, high) = limits
            low, high = self._integer(low), self._integer(high)
            span = range(low, high + 1)
            if index in pinned:
                at = self._integer(pinned[index])
                span = [at] if low <= at <= high else []
            for v in span:
                self.bound[index] = v
                yield from walk(inner)
            self.bound.pop(index, None)
        return walk(list(expr.limits))

    def _Sum(self, expr):
        return sum(self._terms(expr), start=0)

    def _Product(self, expr):
        result = 1
        for term in self._terms(expr):
            result *= term
        return result

    def _ReducedMax(self, expr):
        terms = list(self._terms(expr))
        return max(terms) if expr.extremum is sympy.Max else min(terms)

    def _Max(self, expr):
        return max(self.value(a) for a in expr.args)

    def _Min(self, expr):
        return min(self.value(a) for a in expr.args)

    def _KroneckerDelta(self, expr):
        return int(self.value(expr.args[0]) == self.value(expr.args[1]))

    def _Piecewise(self, expr):
        for value, condition in expr.args:
            if self.value(condition):
                return self.value(value)
        raise Unsupported("a Piecewise with no condition that holds")

    def _Relational(self, expr):
        left, right = self.value(expr.lhs), self.value(expr.rhs)
        return {"==": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
                ">": left > right, ">=": left >= right}[expr.rel_op]

    def _And(self, expr):
        return all(self.value(a) for a in expr.args)

    def _Or(self, expr):
        return any(self.value(a) for a in expr.args)

    def _Not(self, expr):
        return not self.value(expr.args[0])

    def _floor(self, expr):
        return int(mpmath.floor(self.value(expr.args[0])))

    def _Mod(self, expr):
        return self.value(expr.args[0]) % self.value(expr.args[1])

    def _select(self, expr):
        condition, a, b = expr.args
        return self.value(a) if self.value(condition) else self.value(b)

    def _Function(self, expr):
        """Any other function, by sympy's own evaluation at its arguments' exact values."""
        if expr.func in MPMATH:
            result = MPMATH[expr.func](*map(self.value, expr.args))
            if not isinstance(result, mpmath.mpf):
                raise Unsupported(f"{expr.func} at {expr.args} is not a real number")
            return result
        result = expr.func(*map(_exact, map(self.value, expr.args))).evalf(DIGITS)
        if result.is_Integer:
            return int(result)
        if not (result.is_Float and result.is_finite):
            raise Unsupported(f"{expr.func} at {expr.args} is not a real number")
        return mpmath.mpf(result)


def _pinned(expr: sympy.Sum) -> dict:
    """Limit index -> the expression a delta factor of the body pins it to, where that
    expression uses no index of a limit inside it (bound later)."""
    factors = expr.function.args if expr.function.is_Mul else (expr.function,)
    indices = [limit[0] for limit in expr.limits]  # innermost first
    pinned = {}
    for factor in factors:
        if not isinstance(factor, sympy.KroneckerDelta):
            continue
        for index, partner in (factor.args, factor.args[::-1]):
            if index in indices and index not in pinned:
                later = set(indices[:indices.index(index) + 1])
                if not partner.free_symbols & later:
                    pinned[index] = partner
                    break
    return pinned


def _exact(value) -> sympy.Basic:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, mpmath.mpf):
        return sympy.Rational(*value.man_exp[:1]) * sympy.Integer(2) ** value.man_exp[1]
    raise Unsupported(f"an argument {value!r} that is not real")
