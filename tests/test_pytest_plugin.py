"""The pytest plugin, run by the real pytest through pytester."""

from pathlib import Path

import pytest

from .conftest import THOROUGH

GOOD = "x: Real[n]\ny = x**2\no = 1/2 * sum(y)\nassert grad(o, x) == x\n"
FALSE = "x: Real[n]\ny = x**2\no = 1/2 * sum(y)\nassert grad(o, x) == 2 * x\n"


def test_spec_files_are_collected_and_a_failure_shows_verifys_report(pytester):
    pytester.makefile(".vspec", test_good=GOOD, test_false=FALSE, helper=GOOD)
    pytester.makeini("[pytest]\nverify_max_examples = 20\n")
    result = pytester.runpytest("--verify-seed", "1")
    result.assert_outcomes(passed=1, failed=1)  # helper.vspec is not a test file
    result.stdout.fnmatch_lines(["*test_false.vspec:4: claim check failed for grad(o, x)*",
                                 "*reproduce:  verify check *test_false.vspec --seed 1*"])
    assert "pytest_plugin.py" not in result.stdout.str()  # no plugin internals in the report


def test_every_spec_file_once_per_configured_dtype(pytester):
    pytester.makefile(".vspec", helper=GOOD)
    pytester.makeini("[pytest]\nverify_all_specs = true\nverify_max_examples = 10\n"
                     "verify_dtypes =\n    float64\n    float32\n")
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*helper.vspec::float64 PASSED*", "*helper.vspec::float32 PASSED*"])


def test_a_malformed_spec_fails_with_its_spec_error(pytester):
    pytester.makefile(".vspec", test_broken="x: Real[n]\no = sum(x) +\n")
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*syntax error*"])


def test_the_clis_options_as_pytest_options_and_ini_values(pytester):
    pytester.makefile(".vspec", test_good=GOOD)
    pytester.makeini("[pytest]\nverify_dtypes = float32\nverify_modes = rev\nverify_order = 2\n")
    result = pytester.runpytest("-v", "--verify-max-examples", "5", "--verify-dtypes", "float64,bfloat16")
    result.assert_outcomes(passed=2)  # the command line wins over the ini file
    result.stdout.fnmatch_lines(["*test_good.vspec::float64 PASSED*", "*test_good.vspec::bfloat16 PASSED*"])


def test_a_bad_option_value_is_a_usage_error_naming_the_option(pytester):
    pytester.makefile(".vspec", test_good=GOOD)
    result = pytester.runpytest("--verify-order", "3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*verify_order takes 1 or 2*"])


def test_the_docs_ini_snippet_parses_and_collects(pytester):
    snippet = (Path(__file__).parent.parent / "docs" / "ci.md").read_text().split("```ini\n", 1)[1].split("```")[0]
    pytester.makefile(".vspec", test_good=GOOD, helper=FALSE)
    pytester.makeini(snippet.replace("verify_max_examples = 100", "verify_max_examples = 5"))
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)  # test_good in both dtypes; helper.vspec is not a test file
    result.stdout.fnmatch_lines(["*test_good.vspec::float32 PASSED*"])


def test_an_inline_comment_is_dropped_and_a_bad_switch_is_a_usage_error_naming_the_option(pytester):
    pytester.makefile(".vspec", helper=GOOD)
    pytester.makeini("[pytest]\nverify_all_specs = true   # every *.vspec\nverify_max_examples = 5  # quick\n"
                     "verify_dtypes = float64  # one\n")
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nverify_all_specs = sometimes\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*verify_all_specs takes true or false; got 'sometimes'*"])


def test_a_failure_is_replayed_first_by_the_next_session(pytester):
    pytester.makefile(".vspec", test_false=FALSE)
    pytester.runpytest("--verify-seed", "1").assert_outcomes(failed=1)
    assert any((pytester.path / ".verify" / "examples").iterdir())
    result = pytester.runpytest("--verify-seed", "2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*found first by replaying an example kept in*"])


def test_spec_files_run_across_processes_with_xdist(pytester):
    # Each worker imports torch and the rest: the quick profile starts one.
    workers = 2 if THOROUGH else 1
    pytester.makefile(".vspec", **{f"test_spec{k}": GOOD for k in range(2)}, test_false=FALSE)
    result = pytester.runpytest_subprocess("-n", str(workers), "--verify-max-examples", "3", "--verify-seed", "1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([f"*{workers} worker*", "*test_false.vspec:4: claim check failed*"])
