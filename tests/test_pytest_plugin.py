"""The pytest plugin, run by the real pytest through pytester."""

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
