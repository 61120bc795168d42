"""The command line as a user meets it. Most tests call ``verify.cli.main`` in this process,
with its streams, working directory and environment as a shell would give them; the installed
`verify` and `python -m verify` run in a subprocess too."""

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from verify import cli
from verify import plan as planning
from verify.cli import Progress

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "backprop.vspec"


def run(*arguments, cwd=None, env=None):
    """``verify *arguments`` in this process: its exit code and what it printed."""
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    try:
        os.chdir(cwd or saved_cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(list(arguments))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["verify", *arguments], code, stdout.getvalue(), stderr.getvalue())


def run_installed(*arguments, **options):
    return subprocess.run(["verify", *arguments], capture_output=True, text=True, timeout=300, check=False, **options)


def write(directory, name, text):
    path = directory / name
    path.write_text(text)
    return path


def test_the_installed_command_checks_the_example_shipped_in_the_package_exits_0_and_reports_the_proof():
    # The console script and its exit code are the point here: few examples suffice.
    completed = run_installed("check", "--example", "--seed", "1", "--max-examples", "10")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "verify/examples/backprop.vspec" in completed.stdout
    assert "Warning" not in completed.stderr  # torch's own notices are not the user's business
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
    # Each node's adjoint in the inputs and the cotangent g, as a failure's report shows it.
    assert "(g: the cotangent handed to backward, 1 here)" in backward.splitlines()[0]
    assert backward_rows["sum(y)"][:3] == ["g/2", "0.5", "0.5"]
    assert backward_rows["y"][:3] == ["g/2", "[0.5,", "0.5]"]
    assert backward_rows["x"] == ["g*x[i]", "[2,", "4]", "[2,", "4]", "yes"]
    assert "assert grad(o, x) == x: proved for all n" in out


@pytest.mark.shrinks
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


# Its claim's proof takes simplify's whole 10 s before it gives up.
# A false claim sympy tries for seconds to prove (the domain keeps the claim from the quick
# refutation at a sample point, whose values are positive).
SLOW_TO_PLAN = ("x: Interval(-5, -1)[n]\nm = sum(x) / n\nd = x - m\nv = sum(d**2) / n\no = sum(d / sqrt(v + 1))\n"
                "assert grad(o, x) == d\n")


def test_a_spec_past_the_planning_budget_exits_2_at_its_statement_and_the_others_run(tmp_path, monkeypatch):
    # 3 s, so that the claim's work outweighs the steps before it even on a loaded machine.
    monkeypatch.setattr(planning, "PLAN_SECONDS", 3.0)
    write(tmp_path, "good.vspec", "x: Real[n]\no = sum(sin(x))\n")
    slow = write(tmp_path, "slow.vspec", SLOW_TO_PLAN)
    completed = run("check", str(tmp_path), "--max-examples", "5")
    assert completed.returncode == 2
    assert f"{slow}:6:1: the sympy work on this spec ran past its budget of 3 s" in completed.stdout
    assert "went to assert grad(o, x) == d" in completed.stdout
    assert "1 passed, 1 failed" in completed.stdout and "Traceback" not in completed.stdout + completed.stderr


@pytest.mark.parametrize("arguments, message", [
    (["check", "does-not-exist.vspec"], "no such file or directory"),
    (["check", "--max-examples", "0", str(EXAMPLE)], "--max-examples must be at least 1"),
    (["check", "--database", str(EXAMPLE), str(EXAMPLE)], "--database: not a directory"),
    (["check"], "or --example for the bundled one"),
    (["check", "--dtype", "int8", str(EXAMPLE)], "--dtypes takes dtypes from float64, float32"),
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
    completed = subprocess.run([sys.executable, "-m", "verify", "--help"], capture_output=True, text=True,
                               timeout=300, check=False)
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage: verify") and "{check,fuzz,explain,trace}" in completed.stdout



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


GOOD = "x: Real[n]\ny = x**2\no = 1/2 * sum(y)\nassert grad(o, x) == x\n"
FALSE = GOOD.replace("== x", "== 2 * x")


@pytest.mark.examples(20)
@pytest.mark.shrinks
def test_junit_xml_and_json_reports_of_a_good_and_a_false_spec(tmp_path):
    good, bad = write(tmp_path, "good.vspec", GOOD), write(tmp_path, "bad.vspec", FALSE)
    completed = run("check", "--junit-xml", str(tmp_path / "out.xml"), "--json", str(tmp_path / "out.json"),
                    "--seed", "1", "--max-examples", "20", str(good), str(bad))
    assert completed.returncode == 1

    suites = ElementTree.parse(tmp_path / "out.xml").getroot()
    assert (suites.tag, suites.get("tests"), suites.get("failures"), suites.get("errors")) == ("testsuites", "2", "1", "0")
    cases = {case.get("name"): case for case in suites.iter("testcase")}
    assert set(cases) == {f"{good}[float64]", f"{bad}[float64]"}
    assert cases[f"{good}[float64]"].find("failure") is None
    failure = cases[f"{bad}[float64]"].find("failure")
    assert failure.get("type") == "Mismatch" and cases[f"{bad}[float64]"].get("line") == "4"
    assert "claim check failed for grad(o, x)" in failure.text and "reproduce:" in failure.text

    report = json.loads((tmp_path / "out.json").read_text())
    assert report["schema"] == "gradverify.check/1" and report["exit_code"] == 1
    assert report["summary"] == {"runs": 2, "passed": 1, "failed": 1}
    assert report["settings"]["seed"] == 1 and report["settings"]["dtypes"] == ["float64"]
    runs = {entry["path"]: entry for entry in report["runs"]}
    ok, mismatch = runs[str(good)], runs[str(bad)]
    assert ok["verdict"] == "ok" and ok["points"] > 0 and ok["failure"] is None
    assert ok["examples"] >= 20 and ok["time_budget_spent"] is False
    assert ok["claims"] == [{"text": "grad(o, x) == x", "line": 4, "status": "proved for all n"}]
    assert mismatch["verdict"] == "mismatch" and mismatch["line"] == 4 and mismatch["claims"][0]["status"] == "false"
    assert mismatch["failure"]["check"] == "claim" and mismatch["failure"]["sizes"] == {"n": 1}
    assert mismatch["failure"]["reference"] == [1.0] and mismatch["failure"]["actual"] == [2.0]
    assert mismatch["reproduce"] == f"verify check {bad} --seed 1"


def test_a_spec_error_is_a_junit_error_with_its_line(tmp_path):
    broken = write(tmp_path, "broken.vspec", "x: Real[n]\no = sum(q)\n")
    completed = run("check", "--junit-xml", str(tmp_path / "out.xml"), "--json", str(tmp_path / "out.json"),
                    str(broken))
    assert completed.returncode == 2
    (case,) = ElementTree.parse(tmp_path / "out.xml").getroot().iter("testcase")
    assert case.find("error").get("type") == "SpecError" and case.get("line") == "2"
    (entry,) = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert (entry["verdict"], entry["line"], entry["column"]) == ("spec_error", 2, 9)


def test_github_actions_annotations_point_at_the_failing_line(tmp_path):
    bad = write(tmp_path, "bad.vspec", FALSE)
    completed = run("check", "--seed", "1", "--max-examples", "20", str(bad), env={"GITHUB_ACTIONS": "true"})
    (annotation,) = [line for line in completed.stdout.splitlines() if line.startswith("::error ")]
    assert annotation.startswith(f"::error file={bad},line=4,title=verify%3A mismatch (float64)::")
    assert "%0A  claim:      grad(o, x) == 2 * x%0A" in annotation
    assert "::error" not in run("check", "--seed", "1", "--max-examples", "20", str(bad),
                                env={"GITHUB_ACTIONS": "false"}).stdout


def test_output_to_a_pipe_is_plain_lines_one_per_spec_and_dtype(tmp_path):
    for name in ("a", "b"):
        write(tmp_path, f"{name}.vspec", GOOD)
    completed = run("check", "--dtype", "float64,float32", "--max-examples", "5", str(tmp_path))
    assert completed.returncode == 0
    assert "\r" not in completed.stdout + completed.stderr and "\x1b" not in completed.stdout + completed.stderr
    verdicts = [line for line in completed.stdout.splitlines() if line.startswith("ok ")]
    assert [line.split(":")[0].split()[-1] for line in verdicts] == ["(float64)", "(float32)"] * 2
    assert "4 passed, 0 failed" in completed.stdout


def test_a_failure_is_kept_and_replayed_first_by_the_next_run(tmp_path):
    bad = write(tmp_path, "bad.vspec", FALSE)
    first = run("check", "--seed", "1", str(bad), cwd=tmp_path)
    assert first.returncode == 1 and "replaying" not in first.stdout
    assert any((tmp_path / ".verify" / "examples").iterdir())  # the default database
    second = run("check", "--seed", "2", str(bad), cwd=tmp_path)
    assert second.returncode == 1
    assert "found first by replaying an example kept in .verify/examples" in second.stdout
    unkept = run("check", "--seed", "2", "--database", "none", str(bad), cwd=tmp_path)
    assert "replaying" not in unkept.stdout


def test_derandomize_draws_the_same_inputs_every_run(tmp_path):
    spec = write(tmp_path, "good.vspec", GOOD)
    seeds = set()
    for k in range(2):
        assert run("check", "--derandomize", "--max-examples", "5", "--json", str(tmp_path / "out.json"),
                   str(spec)).returncode == 0
        seeds.add(json.loads((tmp_path / "out.json").read_text())["runs"][0]["seed"])
    assert len(seeds) == 1


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_status_line_is_drawn_on_a_terminal_only():
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(stream, total=2)
        progress.show("a.vspec (float64)")
        progress.clear()
    assert "[1/2] checking a.vspec (float64)" in terminal.getvalue() and "\r\x1b[K" in terminal.getvalue()
    assert log.getvalue() == ""


def _many_spec_files(directory, count: int) -> None:
    functions = ["sin", "cos", "exp", "tanh", "sigmoid", "softplus", "log1p", "atan", "sinh", "erf"]
    for k in range(count):
        write(directory, f"spec{k:04d}.vspec", f"x: Real[n]\no = sum({functions[k % 10]}(x) * {k % 7 + 1})\n")
    write(directory, f"spec{count // 2:04d}.vspec", FALSE)


def _ends_with_a_correct_summary(completed, count: int) -> None:
    assert completed.returncode == 1
    assert completed.stdout.rstrip().endswith(f"{count - 1} passed, 1 failed")
    assert completed.stdout.count("\nok ") + completed.stdout.startswith("ok ") == count - 1


def test_many_spec_files_end_with_a_correct_summary_and_the_plan_cache_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "PLAN_CACHE_SIZE", 4)
    _many_spec_files(tmp_path, 12)
    _ends_with_a_correct_summary(run("check", str(tmp_path), "--max-examples", "3", "--modes", "rev",
                                     "--database", "none"), 12)
    assert len(planning._PLANS) <= 4 and len(planning._DERIVED) <= 4  # the plans of specs checked before are dropped


@pytest.mark.thorough
def test_a_thousand_spec_files_end_with_a_correct_summary_in_bounded_memory(tmp_path):
    _many_spec_files(tmp_path, 1000)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    completed = run_installed("check", str(tmp_path), "--max-examples", "3", "--modes", "rev", "--database", "none")
    _ends_with_a_correct_summary(completed, 1000)
    # The plan cache keeps the last 64 specs: memory stays that of a few specs, in kilobytes.
    assert max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) < 1_500_000


def test_a_batch_that_runs_out_of_memory_is_a_spec_error_and_the_other_specs_run(tmp_path):
    # 1.5 GB of address space holds torch, sympy and a small spec, not this one's batch.
    write(tmp_path, "small.vspec", "x: Real[n]\no = sum(sin(x))\n")
    big = write(tmp_path, "big.vspec", "x: Real[1024, 2048]\ny = exp(x)\nz = y * y\no = sum(z)\n")

    def capped():
        resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))

    completed = run_installed("check", str(tmp_path), "--max-examples", "3", preexec_fn=capped)
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert f"{big}: a batch of 1 point(s) ran out of memory" in completed.stdout
    assert "1 passed, 1 failed" in completed.stdout and "Traceback" not in completed.stdout + completed.stderr


@pytest.mark.examples(100000)
def test_a_time_budget_ends_each_spec_early_and_the_reports_say_so(tmp_path):
    good = write(tmp_path, "good.vspec", GOOD)
    completed = run("check", "--time-budget", "0.001", "--max-examples", "100000", "--json",
                    str(tmp_path / "out.json"), str(good))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "as many as the time budget of 0.001 s allowed" in completed.stdout
    (entry,) = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert entry["time_budget_spent"] is True and 1 <= entry["examples"] < 100000
    refused = run("check", "--time-budget", "0", str(good))
    assert refused.returncode == 2 and "--time-budget must be a positive number of seconds" in refused.stderr
