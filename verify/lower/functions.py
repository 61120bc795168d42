"""Sympy functions for ops that torch evaluates whole, by a stable kernel.

Written out in ``exp`` and ``log``, ``sigmoid(x)`` is ``1 / (1 + exp(-x))``, and its float64
evaluation loses every digit where torch's kernel loses none (``-log(1 + exp(-x))`` at
x = 30 is 1e-3 off). Kept whole, such an op is one step with one rounding, evaluated by a
stable numeric twin (``verify.reference``), as torch evaluates it.

Each derivative is written the way torch's backward computes it, from the op's output:
``sigmoid' = sigmoid * (1 - sigmoid)`` and ``expm1' = expm1 + 1``. The math is the same, and
the error bound of that form is the local model of what torch's backward may be off by:
about one rounding of the output, absolute, where the derivative vanishes. Only the terms
that flow through the op get that room.

``rewrite(sympy.exp)`` gives the formula in elementary functions, for proofs of claims.

The module also holds the functions that sympy lacks or gets wrong for the registry:
``stop_gradient``; the roundings to integers (``floor_real`` and kin, derivative 0, apart from
sympy's ``floor``, which index arithmetic uses); ``select`` and ``indicator``, conditions that
stay inside the sums that hold them; and the extrema over index ranges (``ReducedMax``).
"""

from __future__ import annotations

from functools import cache
from itertools import count

import sympy
from sympy.codegen import cfunctions
from sympy.concrete.expr_with_intlimits import ExprWithIntLimits


class _Stable(sympy.Function):
    """One argument, folded to its elementary form for numbers."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:  # exact numbers fold to the elementary form
            return cls._elementary(x)
        return None

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return self._elementary(x)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_finite(self):
        return self.args[0].is_finite


class sigmoid(_Stable):
    """1 / (1 + exp(-x)); its derivative from the output, as torch's sigmoid backward."""

    @staticmethod
    def _elementary(x):
        return 1 / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        return self * (1 - self)


class logsigmoid(_Stable):
    """-log(1 + exp(-x)); its derivative is sigmoid(-x), as torch computes it (exp(-|x|) / (1 + exp(-|x|)))."""

    @staticmethod
    def _elementary(x):
        return -sympy.log(1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        return sigmoid(-self.args[0])


class softplus(_Stable):
    """log(1 + exp(x)) (torch's threshold is the registry's business); its derivative is sigmoid(x)."""

    @staticmethod
    def _elementary(x):
        return sympy.log(1 + sympy.exp(x))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class expm1(cfunctions.expm1):
    """exp(x) - 1; its derivative from the output, expm1(x) + 1, as torch's expm1 backward."""

    def fdiff(self, argindex=1):
        return self + 1


class power(sympy.Function):
    """a**b for an exponent that is no number, kept whole: its derivative in ``a`` is
    b * a**(b - 1), as torch's pow backward computes it, so the rounding of b - 1 (|log a|
    roundings of the result) is in that derivative's allowance. A number exponent gives
    sympy's own power."""

    nargs = 2

    @classmethod
    def eval(cls, a, b):
        if b.is_Number:
            return a**b
        return None

    def fdiff(self, argindex=1):
        a, b = self.args
        return b * power(a, b - 1) if argindex == 1 else self * sympy.log(a)

    def _eval_rewrite_as_exp(self, a, b, **kwargs):
        return a**b

    def _eval_is_real(self):
        a, b = self.args
        return True if a.is_positive and b.is_real else None


class shifted(sympy.Function):
    """``a - m``, rounded once, where m cancels from the formula, as the row's maximum does in
    torch's softmax kernels (``exp(x - m) / sum(exp(x - m))``): m's own error does not reach
    the result, and the step rounds by |a - m|, not |a| + |m| (``verify.reference``).
    Formulas hold it only as compiled, never to be differentiated."""

    nargs = 2

    def _eval_is_real(self):
        return self.args[0].is_real and self.args[1].is_real


class stop_gradient(sympy.Function):
    """The value of its argument, with derivative 0: torch's ``detach``. Numerically it is
    its argument, error bound included (``verify.reference``)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:  # a constant: nothing to stop
            return x
        return None

    def fdiff(self, argindex=1):
        return sympy.S.Zero

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return x

    def _eval_is_real(self):
        return self.args[0].is_real


class kernel(sympy.Function):
    """Its argument, computed by one of an op's torch kernels (its value, the term of its
    backward, its tangent): a mark for the allowance's model (``verify.tolerance``),
    numerically the argument itself. ``kernel_of`` makes one class per op and computation;
    where the op's computation is one fused kernel (``Op.fused``), its steps round in the dtype
    kernels compute in and its result is stored once; its kernel errors (``Op.kernel_error``)
    widen the result."""

    nargs = 1
    op = ""
    computation = ""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x
        return None

    def _eval_derivative(self, symbol):
        return sympy.diff(self.args[0], symbol)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return x

    def _eval_is_real(self):
        return self.args[0].is_real


@cache
def kernel_of(op: str, computation: str) -> type:
    """The ``kernel`` mark of ``op``'s ``computation`` ("value", "backward" or "forward")."""
    return type(f"kernel_{op}_{computation}", (kernel,), {"op": op, "computation": computation})


def unmarked(expr):
    """``expr`` without its ``kernel`` marks: the math alone, as shown to people."""
    return expr.replace(lambda e: isinstance(e, kernel), lambda e: e.args[0])


class indicator(sympy.Function):
    """1 where its condition holds, else 0, with derivative 0. A function, not a Piecewise:
    sympy 1.14 pulls a Piecewise out of a Sum over an index that its condition holds."""

    nargs = 1

    @classmethod
    def eval(cls, condition):
        if condition in (sympy.true, sympy.false):
            return sympy.Integer(1 if condition is sympy.true else 0)
        return None

    def _eval_derivative(self, symbol):
        return sympy.S.Zero  # a condition has no derivative of its own to chain through

    def _eval_is_integer(self):
        return True


class select(sympy.Function):
    """``a`` where ``condition`` holds, else ``b``: torch's ``where``. A function, not a
    Piecewise, for the reason ``indicator`` gives: summed inside a sum (a support count in
    sparsemax), a Piecewise would be pulled out of its own sum. Its derivative selects the
    branches' derivatives, so the gradient flows only into the branch taken."""

    nargs = 3

    @classmethod
    def eval(cls, condition, a, b):
        if condition is sympy.true:
            return a
        if condition is sympy.false or a == b:
            return b
        return None

    def _eval_derivative(self, symbol):
        condition, a, b = self.args
        return select(condition, sympy.diff(a, symbol), sympy.diff(b, symbol))

    def _eval_is_real(self):
        _, a, b = self.args
        return True if a.is_real and b.is_real else None

    def _eval_rewrite_as_exp(self, condition, a, b, **kwargs):
        return sympy.Piecewise((a, condition), (b, True))


class precedes(sympy.Function):
    """1 where element m comes before element j in a stable order of their values a and b
    (largest first when ``descending`` is 1): a ahead of b, or equal to it at a smaller
    position. An element never precedes itself, and a tie between two elements is settled by
    position: ordering is no kink. An integer, so it has no derivative."""

    nargs = 5

    @classmethod
    def eval(cls, a, b, m, j, descending):
        if m == j:
            return sympy.S.Zero
        if a.is_number and b.is_number and m.is_Integer and j.is_Integer:
            ahead = a > b if descending else a < b
            return sympy.Integer(1 if ahead or a == b and m < j else 0)
        return None

    def _eval_derivative(self, symbol):
        return sympy.S.Zero

    def _eval_is_integer(self):
        return True


class _Step(sympy.Function):
    """A rounding to integers: piecewise constant, so its derivative is 0 wherever it exists
    and, by torch's convention, 0 at the jumps too. Distinct from sympy's ``floor``, which the
    lowering uses for exact index arithmetic."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Rational:
            return sympy.Integer(cls._at(x))
        return None

    def fdiff(self, argindex=1):
        return sympy.S.Zero

    def _eval_is_integer(self):
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return self


class round_half_even(_Step):
    """The nearest integer, ties to the even one (torch.round, numpy.round)."""

    @staticmethod
    def _at(x):
        return _nearest_even(x)


class floor_real(_Step):
    """The largest integer at or below x (torch.floor)."""

    @staticmethod
    def _at(x):
        return int(sympy.floor(x))


class ceil_real(_Step):
    """The smallest integer at or above x (torch.ceil)."""

    @staticmethod
    def _at(x):
        return int(sympy.ceiling(x))


class trunc_real(_Step):
    """x with its fraction dropped, toward 0 (torch.trunc)."""

    @staticmethod
    def _at(x):
        return int(sympy.floor(x)) if x >= 0 else int(sympy.ceiling(x))


def _nearest_even(x) -> int:
    below = int(sympy.floor(x))
    fraction = x - below
    if fraction == sympy.Rational(1, 2):
        return below if below % 2 == 0 else below + 1
    return below + 1 if fraction > sympy.Rational(1, 2) else below


SUMMATION_COUNTER = count(1)


def index_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


def fresh_index_symbol() -> sympy.Symbol:
    """A summation index used nowhere else in this process, so substitutions never capture it."""
    return index_symbol(f"_k{next(SUMMATION_COUNTER)}")


class ReducedMax(ExprWithIntLimits):
    """The largest value of ``function`` over its limits, like ``Sum`` for the maximum.

    Its derivative follows torch's convention for ``amax`` and ``norm(p=inf)``: tied maxima
    share the gradient evenly (sympy's own chain rule does the rest).
    """

    extremum = sympy.Max

    def _eval_derivative(self, symbol):
        # Fresh indices, so that the sums over ties do not shadow the index bound inside self.
        fresh = {index: fresh_index_symbol() for index, _, _ in self.limits}
        function = self.function.xreplace(fresh)
        limits = [(fresh[index], low, high) for index, low, high in self.limits]
        tie = Tie(function, self)
        return sympy.Sum(tie * sympy.diff(function, symbol), *limits) / sympy.Sum(tie, *limits)

    def _eval_is_real(self):
        return self.function.is_real

    def doit(self, **hints):
        """Written out as Max(...) once every bound is a number; kept as it is otherwise."""
        function = self.function.doit(**hints)
        if not all(low.is_Integer and high.is_Integer for _, low, high in self.limits):
            return self.func(function, *self.limits)
        terms = [function]
        for index, low, high in self.limits:
            terms = [t.xreplace({index: sympy.Integer(v)}) for t in terms for v in range(int(low), int(high) + 1)]
        return self.extremum(*terms)


class Tie(sympy.Function):
    """1 where ``value`` equals ``extremum``, else 0: the share of a tied maximum.

    A function of its own (not a Piecewise), so that ``Sum.doit`` leaves the count of ties
    alone: sympy 1.14 sums Piecewise((1, Eq(A[k], m)), (0, True)) over k as if the
    condition did not depend on k.
    """

    nargs = 2

    @classmethod
    def eval(cls, value, extremum):
        if value.is_number and extremum.is_number:
            return sympy.Integer(1) if value == extremum else sympy.Integer(0)
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class ReducedMin(ReducedMax):
    """The smallest value of ``function`` over its limits; tied minima share the gradient evenly."""

    extremum = sympy.Min


STEPS = (round_half_even, floor_real, ceil_real, trunc_real)
STABLE_FUNCTIONS = (sigmoid, logsigmoid, softplus, expm1, power, stop_gradient, select)


def elementary(expr):
    """``expr`` with the stable functions written out, for sympy's simplification."""
    return expr.replace(lambda e: isinstance(e, STABLE_FUNCTIONS), lambda e: e.rewrite(sympy.exp))
