"""The pytest front: spec files are tests.

pytest collects ``test_*.vspec`` files (every ``*.vspec`` with ``verify_all_specs = true``) and
checks each one, once per dtype in ``verify_dtypes``. The other options are those of the
CLI (``verify.settings``), as ``--verify-NAME`` or ``verify_NAME`` in the ini file. A failure
shows verify's own report. The plugin is registered through the ``pytest11`` entry point and
imports verify (and torch) only when a spec file is collected.
"""

from __future__ import annotations

import dataclasses

import pytest

from verify import settings

SETTINGS = pytest.StashKey[settings.RunSettings]()
ALL_SPECS = pytest.StashKey[bool]()


def pytest_addoption(parser):
    parser.addini("verify_all_specs", "collect every *.vspec file, not only test_*.vspec (true or false)",
                  default="false")
    settings.add_pytest_options(parser)


def pytest_configure(config):
    # A bad value stops the session before collection.
    try:
        config.stash[ALL_SPECS] = settings.ini_switch(config, "verify_all_specs")
        config.stash[SETTINGS] = _settings(config)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".vspec":
        return None
    if file_path.name.startswith("test_") or parent.config.stash[ALL_SPECS]:
        return SpecFile.from_parent(parent, path=file_path)
    return None


def _settings(config) -> settings.RunSettings:
    chosen = settings.from_pytest(config)
    if chosen.database is None:
        return chosen
    return dataclasses.replace(chosen, database=str(config.rootpath / chosen.database))  # rootpath if relative


class SpecFile(pytest.File):
    def collect(self):
        for dtype in self.config.stash[SETTINGS].dtypes:
            yield SpecItem.from_parent(self, name=dtype, dtype=dtype)


class SpecItem(pytest.Item):
    def __init__(self, *, dtype: str, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype

    def runtest(self):
        import verify

        verify.check(verify.load(self.path), **self.config.stash[SETTINGS].check_arguments(self.dtype))

    def repr_failure(self, excinfo):
        from verify import VerifyError

        if isinstance(excinfo.value, VerifyError):
            return str(excinfo.value)  # the report says it all; the plugin's frames would not
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}[{self.dtype}]"
