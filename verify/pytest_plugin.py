"""The pytest front: spec files are tests.

pytest collects ``test_*.vspec`` files (every ``*.vspec`` with ``verify_all_specs = true``) and
checks each one, once per dtype in ``verify_dtypes``. A failure shows verify's own report.
The plugin is registered through the ``pytest11`` entry point and imports verify (and torch)
only when a spec file is collected.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addini("verify_all_specs", "collect every *.vspec file, not only test_*.vspec", type="bool", default=False)
    parser.addini("verify_dtypes", "dtypes each spec is checked in (float64, float32, bfloat16, float16)",
                  type="linelist", default=["float64"])
    parser.addini("verify_max_examples", "Hypothesis examples per spec and dtype", default="100")
    group = parser.getgroup("verify")
    group.addoption("--verify-seed", type=int, default=None, help="seed for reproducible spec checks")


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".vspec":
        return None
    if file_path.name.startswith("test_") or parent.config.getini("verify_all_specs"):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    def collect(self):
        for dtype in self.config.getini("verify_dtypes"):
            yield SpecItem.from_parent(self, name=dtype, dtype=dtype)


class SpecItem(pytest.Item):
    def __init__(self, *, dtype: str, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype

    def runtest(self):
        import torch

        import verify

        if self.dtype not in ("float64", "float32", "bfloat16", "float16"):
            raise pytest.UsageError(f"verify_dtypes: unknown dtype {self.dtype!r}")
        verify.check(verify.load(self.path), dtype=getattr(torch, self.dtype),
                     max_examples=int(self.config.getini("verify_max_examples")),
                     seed=self.config.getoption("verify_seed"))

    def repr_failure(self, excinfo):
        from verify import VerifyError

        if isinstance(excinfo.value, VerifyError):
            return str(excinfo.value)  # the report says it all; the plugin's frames would not
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}[{self.dtype}]"
