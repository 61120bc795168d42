"""Both lowerings against each other, and the index-notation derivation against concrete expansion.

Every registry op has a row here: a spec that exercises it. The tool itself checks each
row (torch lowering against sympy lowering, values and gradients), and the symbolic-size
formulas are compared with sympy's own evaluation of the same spec expanded at a
concrete size, element by element.
"""

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import verify
from verify import engine
from verify.ops import REGISTRY
from verify.reference import Context

OP_ROWS = {
    "add": "x: Real[n]\ny: Real[n]\no = sum(x + y)",
    "sub": "x: Real[n]\ny: Real\no = sum((x - y) ** 2)",
    "mul": "x: Real[n]\ny: Real[n]\no = sum(x * y * x)",
    "div": "x: Real[n]\ny: Positive[n]\no = sum(x / y)",
    "pow": "x: Positive[n]\ny: Real\no = sum(x ** 3 + x ** (1/2) + 2 ** x + x ** y)",
    "neg": "x: Real[n]\no = sum(-x * x)",
    "pos": "x: Real[n]\ny = x\no = sum(+y * x)",
    "exp": "x: Real[n]\no = sum(exp(x / 4))",
    "log": "x: Positive[n]\no = sum(log(x) * x)",
    "sqrt": "x: Positive[n]\no = sum(sqrt(x) * x)",
    "sin": "x: Real[n]\no = sum(sin(x) * x)",
    "cos": "x: Real[n]\no = sum(cos(x) * x)",
    "tanh": "x: Real[n]\no = sum(tanh(x) * x)",
    "sum": "A: Real[n, m]\ns = sum(A ** 2, axis=1)\nt = sum(A, axis=0, keepdims=True)\no = sum(s) + sum(t * A)",
    "mean": "A: Real[n, m]\no = mean(mean(A ** 3, axis=-1))",
    "matmul": "A: Real[n, k]\nB: Real[k, m]\nv: Real[n]\no = sum((A @ B) ** 2) + (v @ A) @ (v @ A) + v @ v",
    "transpose": "A: Real[n, m]\nB: Real[n, m]\no = sum((A.T @ B) ** 2)",
}


def test_every_registry_op_has_a_row():
    assert set(OP_ROWS) == set(REGISTRY)


@pytest.mark.parametrize("op_name", sorted(OP_ROWS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_lowering_agrees_with_sympy_lowering(op_name, dtype):
    result = verify.check(OP_ROWS[op_name], seed=11, dtype=dtype, max_examples=40)
    assert result.points > 0


def _concrete(spec, sizes):
    """The spec's output as an explicit sympy expression in scalar symbols, at concrete sizes."""
    substitution = {sympy.Symbol(name, integer=True, positive=True): value for name, value in sizes.items()}
    prepared = engine.plan(spec)
    output = prepared.values[spec.output].tensor.expr
    return prepared, output.xreplace(substitution).doit()


@settings(max_examples=15, deadline=None)
@given(op_name=st.sampled_from(sorted(OP_ROWS)), size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_symbolic_size_gradients_match_sympy_on_the_concrete_expansion(op_name, size, seed):
    spec = verify.parse(OP_ROWS[op_name])
    sizes = {name: size for name in spec.size_symbols}
    prepared, expanded = _concrete(spec, sizes)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, declared in spec.inputs.items():
        shape = tuple(d if isinstance(d, int) else sizes[d.name] for d in declared.shape)
        inputs[name] = rng.uniform(0.5, 2.0, size=(1, *shape))
    values, gradients, _ = engine.reference_side(prepared, engine.Example(sizes, inputs))

    def element_symbol(name, index):
        declared = spec.inputs[name]
        base = sympy.IndexedBase(name, **declared.domain.sympy_assumptions())
        return base[index] if declared.shape else sympy.Symbol(name, **declared.domain.sympy_assumptions())

    point = {}
    for name, array in inputs.items():
        for index in np.ndindex(array.shape[1:]):
            point[element_symbol(name, index)] = sympy.Float(array[(0, *index)], 30)
    assert float(expanded.xreplace(point)) == pytest.approx(values[spec.output][0][0], rel=1e-12)
    for name, array in inputs.items():
        for index in np.ndindex(array.shape[1:]):
            exact = sympy.diff(expanded, element_symbol(name, index)).xreplace(point)
            assert float(exact) == pytest.approx(gradients[name][0][0][index], rel=1e-10, abs=1e-12)


def test_reference_context_evaluates_a_whole_batch_at_once():
    spec = verify.parse("x: Real[n]\no = sum(exp(x))")
    prepared = engine.plan(spec)
    batch = np.linspace(-1, 1, 12).reshape(4, 3)
    ctx = Context({"x": (batch, np.zeros_like(batch))}, {"n": 3}, 4)
    value, error = prepared.values["o"](ctx)
    np.testing.assert_allclose(value, np.exp(batch).sum(axis=1), rtol=1e-15)
    assert error.shape == (4,) and np.all(error > 0)
