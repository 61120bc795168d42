"""The index-notation derivation against sympy on the same spec expanded at a concrete size.

The symbolic-size formulas (one derivation for every n) are compared, element by
element, with sympy's own evaluation and differentiation of the spec written out at a
concrete size. (tests/test_ops.py checks the torch lowering against the sympy one.)
"""

import signal
import threading
import time

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import verify
from verify import oracle
from verify import plan as planning
from verify.lower.sympy import OutOfTime, in_inputs, time_limit
from verify.strategies import Example, size_bounds
from verify.tolerance import precision

from .test_ops import ROWS

# Ops whose formulas stay small when expanded at a concrete size.
OP_ROWS = {op: ROWS[op] for op in ["add", "sub", "mul", "div", "pow", "exp", "log", "sqrt", "sin", "tanh", "sum",
                                    "mean", "matmul", "transpose", "softmax", "cumsum", "slice", "concat", "dot"]}


def _concrete(spec, sizes):
    """The spec's output as an explicit sympy expression in scalar symbols, at concrete sizes."""
    substitution = {sympy.Symbol(name, integer=True, positive=True): value for name, value in sizes.items()}
    output = in_inputs(spec, spec.nodes[spec.output]).expr
    return planning.plan(spec), output.xreplace(substitution).doit()


@settings(max_examples=15, deadline=None)
@given(op_name=st.sampled_from(sorted(OP_ROWS)), size=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_symbolic_size_gradients_match_sympy_on_the_concrete_expansion(op_name, size, seed):
    spec = verify.parse(OP_ROWS[op_name])
    sizes = {name: max(size, smallest) for name, (smallest, _) in size_bounds(spec).items()}
    prepared, expanded = _concrete(spec, sizes)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, declared in spec.inputs.items():
        shape = tuple(d if isinstance(d, int) else sizes[d.name] for d in declared.shape)
        inputs[name] = rng.uniform(0.5, 2.0, size=(1, *shape))
    point = Example(sizes, inputs, *planning.unit_directions(spec, sizes, inputs, tangents=False))
    reference = oracle.reference_side(prepared, point, precision(torch.float64))
    values, gradients = reference.values, reference.gradients

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
    prepared = planning.plan(spec)
    batch = np.linspace(-1, 1, 12).reshape(4, 3)
    _, values = oracle.reference_values(prepared, Example({"n": 3}, {"x": batch}, np.ones(4)), precision(torch.float64))
    value, error = values["o"]
    np.testing.assert_allclose(value, np.exp(batch).sum(axis=1), rtol=1e-15)
    assert error.shape == (4,) and np.all(error > 0)


def _busy(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def test_an_outer_alarm_fires_on_time_inside_a_time_limit_and_is_not_cancelled():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(time.monotonic()))
    try:
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with time_limit(5.0):
            _busy(0.8)
        assert len(fired) == 1 and 0.25 <= fired[0] - started < 0.8  # the outer's moment, the outer's handler
        with pytest.raises(OutOfTime):  # and the inner limit still holds after the outer fired
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with time_limit(0.3):
                _busy(2.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_time_limit_holds_in_a_thread_other_than_the_main_one():
    outcome = []

    def work():
        started = time.monotonic()
        try:
            with time_limit(0.2):
                _busy(3.0)
            outcome.append("ran to the end")
        except OutOfTime:
            outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(outcome) == 1 and not isinstance(outcome[0], str) and outcome[0] < 1.0


def _outer_expiring_inside_inner() -> tuple:
    """An outer limit of 0.2 s expiring inside an inner one of 5 s, whose block catches
    OutOfTime: (whether that handler took it, seconds until the outer block ended)."""
    started = time.monotonic()
    caught_inside = []
    try:
        with time_limit(0.2):
            try:
                with time_limit(5.0):
                    _busy(0.5)
            except OutOfTime:
                caught_inside.append(True)
            _busy(1.0)
    except OutOfTime:
        return bool(caught_inside), time.monotonic() - started
    return bool(caught_inside), None


def test_an_outer_time_limit_that_expires_inside_an_inner_one_ends_its_own_block():
    caught_inside, ended = _outer_expiring_inside_inner()
    assert not caught_inside and ended is not None and ended < 0.5


def test_nested_time_limits_hold_in_a_thread_too():
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_outer_expiring_inside_inner()))
    thread.start()
    thread.join()
    (caught_inside, ended), = outcome
    assert not caught_inside and ended is not None and ended < 0.5


def test_a_time_limit_that_is_not_reached_raises_nothing_later():
    with time_limit(0.05):
        pass
    _busy(0.2)  # its timer is gone: nothing is pending for this thread


def test_a_time_limit_gives_an_outer_alarm_back_its_remaining_time():
    fired = []

    def outer(signum, frame):
        fired.append(True)

    previous = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(OutOfTime), time_limit(0.1):
            _busy(1.0)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 2.0 < remaining <= 3.0 and not fired
        assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
