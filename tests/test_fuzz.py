"""Fuzz mode: random specs through several AD paths, findings minimized and saved."""

import subprocess
import sys

import torch
from hypothesis import given, settings

import verify
from verify.fuzz import fuzz, fuzzable_ops, save, spec_texts
from verify.ops import REGISTRY


def _plant_sin_bug(plant_torch_form):
    # sin's torch form off by 1e-3 * x: the kind of bug the fuzzer hunts in torch.
    plant_torch_form("sin", lambda x: torch.sin(x) + 1e-3 * x)


def test_the_fuzzer_finds_a_planted_bug_and_saves_a_spec_and_a_script(plant_torch_form, tmp_path):
    _plant_sin_bug(plant_torch_form)
    findings = fuzz(ops=["sin", "exp"], max_examples=20, seconds=120, paths=("eager",), seed=0, max_findings=1)
    assert findings and all("sin" in f.ops for f in findings)
    spec_path, script_path = save(findings[0], tmp_path, 1)
    assert verify.parse(spec_path.read_text()).example_point() is not None  # the failing point
    shown = subprocess.run([sys.executable, str(script_path)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert shown.returncode == 0 and "exact (sympy):" in shown.stdout


def test_the_fuzzer_is_deterministic_with_a_seed(plant_torch_form):
    _plant_sin_bug(plant_torch_form)
    runs = [[(f.spec, f.key) for f in fuzz(ops=["sin", "tanh"], max_examples=10, seconds=300, paths=("eager",),
                                            seed=5, max_findings=1)] for _ in range(2)]
    assert runs[0] and runs[0] == runs[1]


@settings(max_examples=50, deadline=None)
@given(spec_texts(["exp", "sin"]))
def test_generated_specs_parse_and_use_only_the_chosen_ops(text):
    spec = verify.parse(text)
    assert {node.op for node in spec.nodes.values()} <= set(REGISTRY)
    assert "tanh" not in text


def test_fuzzable_ops_are_registry_ops_torch_names_the_same_way():
    ops = fuzzable_ops()
    assert {"sin", "exp", "sigmoid", "gelu", "lgamma"} <= set(ops) and "pos" not in ops


def test_the_fuzz_command_over_correct_ops_finds_nothing_and_exits_0(tmp_path):
    completed = subprocess.run(["verify", "fuzz", "--ops", "sin,exp", "--max-examples", "3", "--time", "60",
                                "--out", str(tmp_path / "found"), "--modes", "rev"],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "0 finding(s)" in completed.stdout
