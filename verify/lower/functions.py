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
"""

from __future__ import annotations

import sympy
from sympy.codegen import cfunctions


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


STABLE_FUNCTIONS = (sigmoid, logsigmoid, softplus, expm1, power, stop_gradient)


def elementary(expr):
    """``expr`` with the stable functions written out, for sympy's simplification."""
    return expr.replace(lambda e: isinstance(e, STABLE_FUNCTIONS), lambda e: e.rewrite(sympy.exp))
