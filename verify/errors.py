"""The exception hierarchy: one root, and each class is also the builtin users already catch."""

from __future__ import annotations


class VerifyError(Exception):
    """Root of every error this package raises on purpose."""


class SpecError(VerifyError, ValueError):
    """A spec that cannot be read: bad syntax, a construct outside the whitelist, a shape error.

    ``line`` and ``column`` are 1-based and point at the offending text; ``str(error)``
    shows the line with a caret under that column and says what is accepted there.
    """

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None,
                 line: int | None = None, column: int | None = None, hint: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.hint = hint
        super().__init__(self._render(source))

    def _render(self, source: str | None) -> str:
        where = self.path or "<spec>"
        if self.line is None:
            head = f"{where}: {self.message}"
        else:
            head = f"{where}:{self.line}:{self.column or 1}: {self.message}"
        parts = [head]
        if source is not None and self.line is not None:
            lines = source.splitlines()
            if 1 <= self.line <= len(lines):
                text = lines[self.line - 1].expandtabs(1)
                parts.append("    " + text)
                parts.append("    " + " " * ((self.column or 1) - 1) + "^")
        if self.hint:
            parts.append(self.hint)
        return "\n".join(parts)


class Mismatch(VerifyError, AssertionError):
    """Torch and the sympy reference disagree, or a claim is false.

    ``failure`` holds the structured counterexample (see ``verify.report.Failure``), and
    ``result`` what was checked before it was found.
    """

    def __init__(self, report: str, failure=None, result=None):
        self.failure = failure
        self.result = result
        super().__init__(report)


class Unchecked(VerifyError, AssertionError):
    """No point could be checked: every point drawn was rejected (see ``result.rejected``).

    A run that verified nothing must not pass silently.
    """

    def __init__(self, report: str, result=None):
        self.result = result
        super().__init__(report)


class Inconclusive(Unchecked):
    """The checks could not decide: float64 was sure of a disagreement that the exact pass
    could not settle, or (with ``require_power``) most of a check's elements were weak,
    rejected or left unjudged. Not a pass: ``result`` says what was checked."""


class Unsupported(Unchecked):
    """A check that was asked for could not run: the code under test does not support forward
    mode (a Function without ``jvp``), or the dtype (an op without a kernel for it).

    Not a pass: ``result`` says what was checked, and ``result.unsupported`` what was not.
    """
