"""verify/__init__.py is the whole public API."""

import verify


def test_all_lists_exactly_the_public_names():
    # pytest's assertion rewriting of its plugin's package adds "@py_builtins" and the like.
    public = {name for name in dir(verify) if not name.startswith(("_", "@"))}
    modules = {"api", "engine", "errors", "ir", "lower", "ops", "reference", "report", "spec", "strategies",
               "tolerance", "explain", "cli", "subject", "pytest_plugin"}
    assert set(verify.__all__) == public - modules


def test_exceptions_are_also_the_builtins_users_catch():
    assert issubclass(verify.SpecError, ValueError) and issubclass(verify.SpecError, verify.VerifyError)
    assert issubclass(verify.Mismatch, AssertionError) and issubclass(verify.Mismatch, verify.VerifyError)
