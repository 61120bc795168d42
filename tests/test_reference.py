"""The compiled reference: its values against sympy's exact evaluation, and its error bounds."""

import numpy as np
import pytest
import sympy
import torch
from flint import arb
from hypothesis import example, given, settings
from hypothesis import strategies as st

import verify
from verify import acceptance, balls, oracle
from verify import plan as planning
from verify.lower.sympy import Tensor, in_inputs
from verify.reference import Context, Reference, UnsupportedFormula
from verify.strategies import Example
from verify.tolerance import precision

UNARY = ["exp", "sin", "cos", "tanh", "neg", "square", "sqrt_of_square_plus_one", "log_of_square_plus_one"]
BINARY = ["+", "-", "*"]
TEMPLATES = {"square": "({})**2", "sqrt_of_square_plus_one": "sqrt(({})**2 + 1)",
             "log_of_square_plus_one": "log(({})**2 + 1)", "neg": "-({})"}


@st.composite
def formulas(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(["x", "y"]))
    if draw(st.booleans()):
        name = draw(st.sampled_from(UNARY))
        inner = draw(formulas(depth - 1))
        return TEMPLATES.get(name, name + "({})").format(inner)
    return f"({draw(formulas(depth - 1))} {draw(st.sampled_from(BINARY))} {draw(formulas(depth - 1))})"


@settings(max_examples=150, deadline=None)
@given(formulas(), st.floats(-3, 3), st.floats(-3, 3))
@example("cos(log((y)**2 + 1))", 0.0, 5.179475653321955e-158)  # underflow, then a zero partial
def test_value_and_error_bound_against_exact_evaluation(formula, x, y):
    spec = verify.parse(f"x: Real\ny: Real\no = {formula} + 0 * x * y")
    prepared = planning.plan(spec)
    values = oracle.reference_side(
        prepared, Example({}, {"x": np.array([x]), "y": np.array([y])}, np.ones(1)), precision(torch.float64)).values
    value, bound = values["o"]
    exact = in_inputs(spec, spec.nodes["o"]).expr.xreplace(
        {sympy.Symbol("x", real=True): sympy.Float(x, 60), sympy.Symbol("y", real=True): sympy.Float(y, 60)}
    ).evalf(60)
    if not np.isfinite(value[0]) or np.isnan(bound[0]):
        return  # float64 overflowed, or underflowed (its bound is lost): the exact pass decides
    # The bound is first order; twice it covers the higher-order terms at these magnitudes.
    assert abs(sympy.Float(value[0], 60) - exact) <= 2 * 2.0**-53 * float(bound[0]) + 1e-300


def test_sums_over_symbolic_sizes_become_reductions():
    n, i, k = sympy.Symbol("n", integer=True, positive=True), *sympy.symbols("i k", integer=True, nonnegative=True)
    x = sympy.IndexedBase("x")
    formula = Tensor(sympy.Sum(x[k] * x[i], (k, 0, n - 1)), (i,), (n,))
    reference = Reference(formula, frozenset({"n"}))
    batch = np.arange(6.0).reshape(2, 3)
    ctx = Context({"x": (batch, np.zeros_like(batch))}, {"n": 3}, 2)
    value, _ = reference(ctx)
    np.testing.assert_array_equal(value, batch.sum(axis=1, keepdims=True) * batch)


@pytest.mark.parametrize("build", [
    lambda A, B, x, i, j, k, n: (sympy.Sum(A[i, k] * B[k, j], (k, 0, n - 1)), (i, j)),  # matmul
    lambda A, B, x, i, j, k, n: (sympy.Sum(3 * A[i, k] * x[k] * x[j], (k, 0, n - 1)), (i, j)),  # a scalar factor
    lambda A, B, x, i, j, k, n: (sympy.Sum(x[i] * x[j], (k, 0, n - 1)), (i, j)),  # no factor spans k
    lambda A, B, x, i, j, k, n: (sympy.Sum(A[i, k] * B[k, j], (k, 0, n - 1), (j, 0, n - 1)), (i,)),
    lambda A, B, x, i, j, k, n: (sympy.Sum(A[i, k] * x[k], (k, 0, i)), (i,)),  # bounds on an outer index
])
def test_sums_of_products_take_the_same_values_without_error_arithmetic(build):
    # Without error arithmetic, a sum of products goes to einsum; with it, products are formed.
    n = sympy.Symbol("n", integer=True, positive=True)
    i, j, k = sympy.symbols("i j k", integer=True, nonnegative=True)
    A, B, x = sympy.IndexedBase("A"), sympy.IndexedBase("B"), sympy.IndexedBase("x")
    expr, indices = build(A, B, x, i, j, k, n)
    reference = Reference(Tensor(expr, indices, (n,) * len(indices)), frozenset({"n"}))
    rng = np.random.default_rng(0)
    arrays = {"A": rng.normal(size=(5, 3, 3)), "B": rng.normal(size=(5, 3, 3)), "x": rng.normal(size=(5, 3))}

    def context():
        return Context({name: (a, np.abs(a)) for name, a in arrays.items()}, {"n": 3}, 5)

    np.testing.assert_allclose(reference.estimate(context())[0], reference(context())[0], rtol=1e-14, atol=1e-14)


def test_a_floor_that_overflows_stays_infinite_and_confirms_nothing():
    # The terms cancel to 0, but their magnitudes overflow: only the bounds may judge this point.
    n, k = sympy.Symbol("n", integer=True, positive=True), sympy.Symbol("k", integer=True, nonnegative=True)
    x = sympy.IndexedBase("x")
    reference = Reference(Tensor(sympy.Sum(x[k], (k, 0, n - 1)), (), ()), frozenset({"n"}), a_priori=True)
    batch = np.array([[1e308, -1e308]])
    value, floor = reference.estimate(Context({"x": (batch, np.abs(batch))}, {"n": 2}, 1))
    assert value.tolist() == [0.0] and np.isinf(floor).all()
    assert not acceptance.agreeing(value, floor, np.array([1e290]), precision(torch.float64))[0].any()


def test_unknown_function_is_refused_when_compiled():
    formula = Tensor(sympy.gamma(sympy.Symbol("x", real=True)), (), ())
    with pytest.raises(UnsupportedFormula, match="gamma"):
        Reference(formula, frozenset())


def test_an_index_ball_is_its_integer_no_index_where_it_holds_none_and_undecided_where_it_holds_several():
    # Reshape's VJP indexes by (i - k) / c, an integer only where its Piecewise's condition holds.
    third, whole = arb(1) / 3, arb(3) / 3
    assert list(balls.to_integers(np.array([whole, arb(2), 4.0, third, 0.5], dtype=object))) == [
        1, 2, 4, balls.NOT_AN_INTEGER, balls.NOT_AN_INTEGER]
    with pytest.raises(balls.Undecided):
        balls.to_integers(np.array([arb(2.5, 0.6)], dtype=object))
