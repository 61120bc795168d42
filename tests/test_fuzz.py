"""Fuzz mode: random specs through several AD paths, findings minimized and saved."""

import contextlib
import io
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import verify
from verify import fuzz as fuzzing
from verify.fuzz import PATHS, SECOND_ORDER_PATHS, Finding, check_paths, fuzz, fuzzable_ops, save, spec_texts
from verify.ir import graph_nodes
from verify.ops import REGISTRY
from verify.report import Failure

from .conftest import THOROUGH
from .test_cli import run


def _plant_sin_bug(plant_torch_form):
    # sin's torch form off by 1e-3 * x: the kind of bug the fuzzer hunts in torch.
    plant_torch_form("sin", lambda x: torch.sin(x) + 1e-3 * x)


def test_the_fuzzer_finds_a_planted_bug_and_saves_a_spec_and_a_script(plant_torch_form, tmp_path):
    _plant_sin_bug(plant_torch_form)
    findings = fuzz(ops=["sin", "exp"], max_examples=20, seconds=120, paths=("eager",), seed=0, max_findings=1,
                    reach="elementwise")
    assert findings and all("sin" in f.ops for f in findings)
    spec_path, script_path = save(findings[0], tmp_path, 1)
    assert verify.parse(spec_path.read_text()).example_point() is not None  # the failing point
    assert "exact (sympy):" in shown_by(script_path)


def shown_by(script_path) -> str:
    """What a finding's script prints, run in this process; it imports torch alone. (The
    script of torch's trigamma finding runs in a process of its own.)"""
    assert "import verify" not in script_path.read_text()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(script_path), run_name="__main__")
    return printed.getvalue()


def test_the_fuzzer_is_deterministic_with_a_seed(plant_torch_form):
    _plant_sin_bug(plant_torch_form)
    runs = [[(f.spec, f.key) for f in fuzz(ops=["sin", "tanh"], max_examples=10, seconds=300, paths=("eager",),
                                            seed=5, max_findings=1, reach="elementwise")] for _ in range(2)]
    assert runs[0] and runs[0] == runs[1]


@pytest.fixture
def quick_compile(monkeypatch):
    """The compile path with aot_eager (dynamo and AOT autograd, without inductor's C++ build,
    tens of seconds here) in the quick profile; as users run it in the thorough one."""
    if not THOROUGH:
        monkeypatch.setattr(fuzzing, "compile_backend", lambda: ("aot_eager", "aot_eager (the quick test profile)"))


# Compiling takes seconds here: the quick profile leaves that path to the thorough one.
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.thorough] if p == "compile" else [])
                                  for p in PATHS if p != "eager"])
def test_each_torch_func_path_agrees_on_correct_ops_and_catches_a_planted_bug(path, plant_torch_form, quick_compile):
    text = "x: Real[n]\ny: Real\no = sum(sin(x) * exp(y * x))\n"
    order = 2 if path in SECOND_ORDER_PATHS else 1
    assert check_paths(text, paths=(path,), order=order, modes=("rev",), max_examples=5) is None
    _plant_sin_bug(plant_torch_form)
    finding = check_paths(text, paths=(path,), order=order, modes=("rev",), max_examples=5)
    assert finding is not None and finding.path == path and "sin" in finding.ops


def test_the_hessian_path_runs_at_second_order_only(plant_torch_form):
    _plant_sin_bug(plant_torch_form)  # found by every path that runs
    assert check_paths("x: Real[n]\no = sum(sin(x))\n", paths=("func.hessian",), order=1) is None
    assert check_paths("x: Real[n]\no = sum(sin(x))\n", paths=("func.hessian",), order=2) is not None


@settings(max_examples=50, deadline=None)
@given(spec_texts(["exp", "sin"], reach="elementwise"))
def test_generated_specs_parse_and_use_only_the_chosen_ops(text):
    spec = verify.parse(text)
    assert {node.op for node in spec.nodes.values()} <= set(REGISTRY)
    assert "tanh" not in text


def test_fuzzable_ops_are_the_registry_ops_a_spec_calls_by_name():
    ops = fuzzable_ops()
    assert {"sin", "exp", "sigmoid", "gelu", "lgamma"} <= set(ops) and "pos" not in ops and "neg" not in ops


# What the registry reach must draw: reductions with axes and keepdims, the axis-wise ops,
# binary ops, where with comparisons, the structural and linear-algebra ops, and broadcasting.
REACHED = {"sum", "mean", "prod", "amax", "amin", "logsumexp", "var", "std", "norm", "softmax", "log_softmax",
           "cumsum", "cumprod", "logcumsumexp", "maximum", "minimum", "atan2", "hypot", "where", "matmul",
           "transpose", "outer", "trace", "diag", "dot", "reshape", "concat", "stack", "slice", "det", "inv",
           "greater", "less_equal", "mul", "div", "sort", "clamp", "einsum", "swapaxes", "permute"}


def test_registry_specs_reach_reductions_structure_linear_algebra_and_broadcasting():
    seen, keepdims, broadcast = set(), False, False

    @settings(max_examples=400, deadline=None, database=None)
    @given(spec_texts(["exp", "sin"]))
    def draw(text):
        nonlocal keepdims, broadcast
        spec = verify.parse(text)  # well typed: every drawn spec parses
        seen.update(node.op for node in graph_nodes(spec) if hasattr(node, "op"))
        keepdims |= "keepdims=True" in text
        broadcast |= "A: Real[n, n]" in text and "s: Real\n" in text

    draw()
    assert REACHED <= seen, REACHED - seen
    assert keepdims and broadcast


def test_the_fuzz_command_over_correct_ops_finds_nothing_and_exits_0(tmp_path):
    paths = ",".join(p for p in PATHS if p != "compile")  # compiling takes tens of seconds here
    completed = run("fuzz", "--ops", "sin,exp", "--reach", "elementwise", "--paths", paths, "--max-examples", "1",
                    "--time", "60" if THOROUGH else "3", "--out", str(tmp_path / "found"), "--modes", "rev")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert re.search(r"0 finding\(s\); [1-9]\d* spec\(s\) checked along 7 path\(s\)", completed.stdout)


def test_an_unknown_path_is_a_usage_error(tmp_path):
    completed = run("fuzz", "--paths", "eager,func.nope", "--out", str(tmp_path))
    assert completed.returncode == 2 and "--paths takes eager" in completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_zero_tensor_from_torch_func_is_a_zero_not_an_error():
    # jacfwd's double backward of x + 0 * x hands back a ZeroTensor, which numpy() refuses.
    assert check_paths("x: Real[n]\no = x + 0 * x\n", paths=("func.jacfwd",), order=2, max_examples=5) is None


def test_an_error_of_verify_itself_is_saved_as_a_spec_with_the_error(tmp_path):
    finding = Finding("x: Real[n]\no = sin(x)\n", "func.vjp", "verify raised RuntimeError", (),
                      "RuntimeError: boom", None)
    spec_path, script_path = save(finding, tmp_path, 1)
    assert script_path is None and "RuntimeError: boom" in spec_path.read_text()
    assert verify.parse(spec_path.read_text()).output == "o"


def test_torchs_trigamma_is_caught_in_lgammas_second_derivative_and_its_script_shows_it(tmp_path):
    # Found by a 10-minute fuzz run (docs/findings.md); y is unused, as the shrinker left it. The
    # spec's example point is the finding's; the draws may find the same bug elsewhere first.
    finding = check_paths("x: Real[n] = [1.0]\ny: Real = 0.0\no = acos(lgamma(x)) + 0 * x\n", paths=("eager",),
                          order=2, modes=("rev",))
    assert finding is not None and finding.check == "HVP"
    _, script_path = save(finding, tmp_path, 1)
    shown = subprocess.run([sys.executable, str(script_path)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    # The script prints torch's product, then the exact one: they differ by trigamma's 1e-10 or so.
    torch_value, exact = (float(re.search(pattern, shown.stdout).group(1)) for pattern in
                          (r"tensor\(\[(-?[\d.e+-]+)\]", r"exact \(sympy\): \[(-?[\d.e+-]+)\]"))
    assert 1e-12 < abs(torch_value - exact) / abs(exact) < 1e-8


def test_a_planted_bug_in_a_structural_op_is_found_classified_and_shown_by_a_torch_only_script(
        plant_torch_form, tmp_path):
    matmul = REGISTRY["matmul"].torch_form
    plant_torch_form("matmul", lambda *operands: matmul(*operands) * 1.001)
    text = "x: Real[n]\nA: Real[n, n]\no = sum(softmax(A @ x) * cumsum(x, axis=0))\n"  # as the registry reach draws
    finding = check_paths(text, paths=("eager",), modes=("rev",))
    assert finding is not None and "@" in finding.ops and finding.kind == "torch bug"
    _, script_path = save(finding, tmp_path, 1)
    assert "torch.ops.aten" in script_path.read_text()
    assert "exact (sympy):" in shown_by(script_path)


def test_findings_are_classified_by_what_raised():
    def finding(check, error, failure=True):
        found = Failure(check, "compiled", "", {"x": np.zeros(1)}, {"n": 1}, None, None, None, error=error)
        return Finding("x: Real[n]\no = sin(x)\n", "compile", check, ("sin",), error, found if failure else None)

    assert finding("verify raised KeyError", "boom", failure=False).kind == "limitation of this tool"
    assert finding("gradient", "compiled raised RuntimeError: double backward is not supported").kind == \
        "torch: unsupported"
    assert finding("value", "compiled raised IndexError: index 3 is out of bounds").kind == "torch bug"


def test_a_point_where_the_specs_own_steps_overflow_is_no_finding_on_another_path(monkeypatch):
    # log(exp(x)) is x, yet exp overflows past 709: the eager path rejects such points, and a
    # path that computes the same steps as a function is judged by the same rule.
    text = "x: Real[n] = [800.0]\no = sum(log(exp(x)))\n"
    assert check_paths(text, paths=("func.vjp",), modes=("rev",)) is None
    monkeypatch.setattr(fuzzing, "_rejected_by_eager", lambda *arguments: False)
    assert check_paths(text, paths=("func.vjp",), modes=("rev",)) is not None
