"""verify/__init__.py is the whole public API."""

import doctest
import importlib

import pytest
import torch
from hypothesis import given, settings

import verify
from verify.strategies import inputs


def test_all_lists_exactly_the_public_names():
    # pytest's assertion rewriting of its plugin's package adds "@py_builtins" and the like.
    public = {name for name in dir(verify) if not name.startswith(("_", "@"))}
    modules = {"api", "engine", "checks", "errors", "ir", "lower", "ops", "reference", "report", "spec", "strategies",
               "tolerance", "explain", "cli", "subject", "pytest_plugin", "settings", "outcomes", "fuzz", "plan",
               "oracle", "acceptance", "balls", "binding", "findings", "trace", "layouts"}
    assert set(verify.__all__) == public - modules


def test_exceptions_are_also_the_builtins_users_catch():
    assert issubclass(verify.SpecError, ValueError) and issubclass(verify.SpecError, verify.VerifyError)
    assert issubclass(verify.Mismatch, AssertionError) and issubclass(verify.Mismatch, verify.VerifyError)


@pytest.mark.parametrize("module", ["verify", "verify.api", "verify.strategies", "verify.trace"])
def test_docstring_examples_run(module):
    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted > 0 and failed == 0


@settings(max_examples=30)
@given(inputs("W: Real[m, n]\nx: Positive[n]\nb: Interval(-1, 1)\no = sum(W @ log(x)) + b", dtype=torch.float32))
def test_strategies_inputs_draws_tensors_inside_the_domains_with_consistent_sizes(point):
    assert list(point) == ["W", "x", "b"]
    assert all(t.dtype == torch.float32 for t in point.values())
    assert point["W"].shape[1] == point["x"].shape[0] and point["b"].shape == ()
    assert (point["x"] > 0).all() and -1 <= point["b"] <= 1


@given(inputs("x: Real[n]\no = sum(x)", sizes={"n": 5}, dtype=torch.bfloat16))
def test_strategies_inputs_honours_fixed_sizes(point):
    assert point["x"].shape == (5,) and point["x"].dtype == torch.bfloat16


@settings(max_examples=10)
@given(inputs("x: Positive[n]\nW: Interval(-1, 1)[n, n]\no = sum(W @ log(x))", sizes={"n": 300}))
def test_large_inputs_are_materialized_inside_their_domains(point):
    assert point["x"].shape == (300,) and (point["x"] > 0).all() and torch.isfinite(point["x"]).all()
    assert point["W"].shape == (300, 300) and (point["W"].abs() <= 1).all()
