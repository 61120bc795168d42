"""The command line as a user meets it: the installed `verify` in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "backprop.vspec"


def run(*arguments, cwd=None):
    return subprocess.run(["verify", *arguments], capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def test_check_the_bundled_example_exits_0_and_reports_the_proof():
    completed = run("check", str(EXAMPLE), "--seed", "1")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "ok       " in completed.stdout
    assert "claim `grad(o, x) == x`: proved for all n" in completed.stdout
    assert "1 passed, 0 failed" in completed.stdout


def test_explain_walks_through_the_backprop_example():
    completed = run("explain", str(EXAMPLE))
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "x = [2, 4] (n = 2)" in out
    forward, backward = out.split("backward:")
    assert "[4, 16]" in forward and "PowBackward0" in forward
    assert "10" in forward.split("\n  o ")[1] and "MulBackward0" in forward
    backward_rows = {line.split()[0]: line.split()[1:] for line in backward.splitlines()[2:] if line.strip()
                     and not line.startswith("claims") and line.startswith("  ") and not line.startswith("  assert")}
    assert backward_rows["sum(y)"][:3] == ["1/2", "0.5", "0.5"]
    assert backward_rows["y"][0] == "1/2"
    assert backward_rows["x"] == ["x[i]", "[2,", "4]", "[2,", "4]", "yes"]
    assert "assert grad(o, x) == x: proved for all n" in out


def test_false_claim_exits_1_with_the_shrunk_input_the_formula_and_both_values(tmp_path):
    spec = write(tmp_path, "false.vspec", EXAMPLE.read_text().replace("== x", "== 2 * x"))
    completed = run("check", str(spec), "--seed", "3")
    assert completed.returncode == 1
    out = completed.stdout
    assert f"MISMATCH {spec}" in out
    for fragment in [":6: claim check failed for grad(o, x)", "claim:      grad(o, x) == 2 * x",
                     "symbolic:   ∂o/∂x[i] = x[i]", "sizes:      n = 1", "input:      x = [",
                     "derivative: [", "claimed:    [", f"reproduce:  verify check {spec} --seed 3"]:
        assert fragment in out
    assert "0 passed, 1 failed" in out


@pytest.mark.parametrize("text, where, message", [
    ("x: Real[n]\ny = x +\n", ":2:8:", "syntax error"),
    ("x: Real[n]\no = sum(z)\n", ":2:9:", "unknown name 'z'"),
    ("x: Real[n]\no = __import__('os').system('touch PWNED')\n", ":2:5:", "only ops of the registry can be called"),
])
def test_spec_errors_exit_2_with_line_and_column_and_execute_nothing(tmp_path, text, where, message):
    spec = write(tmp_path, "bad.vspec", text)
    completed = run("check", str(spec), cwd=tmp_path)
    assert completed.returncode == 2
    assert f"{spec}{where}" in completed.stdout and message in completed.stdout
    assert "Traceback" not in completed.stdout + completed.stderr
    assert not (tmp_path / "PWNED").exists()


def test_a_directory_is_searched_for_specs_and_the_worst_verdict_wins(tmp_path):
    write(tmp_path, "good.vspec", "x: Real[n]\no = sum(sin(x))\n")
    write(tmp_path, "bad.vspec", "x: Real[n]\no = sum(q)\n")
    completed = run("check", str(tmp_path), "--max-examples", "10")
    assert completed.returncode == 2
    assert "1 passed, 1 failed" in completed.stdout


@pytest.mark.parametrize("arguments, message", [
    (["check", "does-not-exist.vspec"], "no such file or directory"),
    (["check", "--max-examples", "0", str(EXAMPLE)], "--max-examples must be at least 1"),
    (["check"], "the following arguments are required"),
    (["check", "--dtype", "int8", str(EXAMPLE)], "invalid choice"),
])
def test_usage_errors_exit_2_without_a_traceback(arguments, message):
    completed = run(*arguments)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_empty_directory_and_undecodable_file_are_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run("check", str(tmp_path / "empty")).returncode == 2
    binary = tmp_path / "binary.vspec"
    binary.write_bytes(b"x: Real\n\xff\xfe = x\n")
    completed = run("check", str(binary))
    assert completed.returncode == 2
    assert "not UTF-8" in completed.stdout and "Traceback" not in completed.stdout + completed.stderr


def test_python_dash_m_verify_runs_the_same_command():
    completed = subprocess.run([sys.executable, "-m", "verify", "check", str(EXAMPLE), "--max-examples", "5"],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0
    assert "proved for all n" in completed.stdout


def test_second_order_and_modes_from_the_command_line(tmp_path):
    spec = write(tmp_path, "cube.vspec", "x: Real[n]\no = sum(x**3) / 3\nassert hessian(o, x) == diag(2 * x)\n")
    completed = run("check", str(spec), "--seed", "1", "--order", "2", "--modes", "rev", "--max-examples", "20")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "values, VJPs, HVPs" in completed.stdout
    assert "claim `hessian(o, x) == diag(2 * x)`: proved for all n" in completed.stdout


def test_unknown_mode_is_a_usage_error(tmp_path):
    completed = run("check", str(EXAMPLE), "--modes", "sideways")
    assert completed.returncode == 2
    assert "--modes takes rev, fwd or rev,fwd" in completed.stderr
