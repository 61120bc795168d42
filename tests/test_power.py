"""Power, reported: elements whose allowance is at least their exact value (weak, where a zero
would pass too), the coverage warning that counts them with rejected and unjudged points, the
option that fails such a run, and a run the exact pass cannot decide."""

import json

import pytest
import torch

import verify
from verify import balls

from .conftest import planted
from .test_cli import run, write

# In float32, x + 1e8 rounds to a multiple of 8: y's value is allowed more than x itself, so its
# value check is weak throughout, while the gradients (exactly 1) are judged with power.
WEAK_VALUE = "x: Interval(1, 2)[n]\nz = x + 100000000\ny = z - 100000000"


def test_weak_elements_are_counted_per_check_and_warned_about():
    result = verify.check(WEAK_VALUE, dtype=torch.float32, seed=0, max_examples=5)
    weak, judged = result.weak["the value of y"]
    assert weak == judged > 0
    assert result.weak["∂y/∂x"][0] == 0
    assert any(warning.startswith("the value of y: 100% of its elements were weak") for warning in result.warnings)
    assert not any(warning.startswith("∂y/∂x") for warning in result.warnings)


def test_require_power_fails_a_run_whose_checks_are_mostly_weak_and_passes_one_with_power():
    with pytest.raises(verify.Inconclusive, match="the value of y: 100% of its elements were weak"):
        verify.check(WEAK_VALUE, dtype=torch.float32, seed=0, max_examples=5, require_power=True)
    assert verify.check("x: Interval(1, 2)[n]\ny = x * x", dtype=torch.float32, seed=0, max_examples=5,
                        require_power=True).points > 0


def test_the_cli_reports_weak_elements_in_json_and_fails_under_require_power(tmp_path):
    spec = write(tmp_path, "weak.vspec", WEAK_VALUE)
    report = tmp_path / "report.json"
    passed = run("check", str(spec), "--dtypes", "float32", "--max-examples", "5", "--json", str(report))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    (outcome,) = json.loads(report.read_text())["runs"]
    assert outcome["weak"]["the value of y"]["weak"] == outcome["weak"]["the value of y"]["judged"] > 0
    assert "100% of its elements were weak" in passed.stdout
    failed = run("check", str(spec), "--dtypes", "float32", "--max-examples", "5", "--require-power")
    assert failed.returncode == 1
    assert "INCONCLUSIVE" in failed.stdout


def test_a_sure_disagreement_the_exact_pass_cannot_decide_is_inconclusive_not_a_pass(monkeypatch):
    # At 8 bits no ball of exp(x) is settled, so float64's sure disagreement stays undecided.
    monkeypatch.setattr(balls, "PRECISIONS", (8,))

    scaled = planted(torch.exp, lambda x, grad: grad * torch.exp(x) * (1 + 1e-6))
    with pytest.raises(verify.Inconclusive, match="inconclusive"):
        verify.check_function(scaled, "x: Interval(0.5, 2)[n]\ny = exp(x)", seed=0, max_examples=5,
                              modes=("rev",))
