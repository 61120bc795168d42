"""What ``verify check`` found, per spec and dtype, and the machine-readable forms of it.

* ``--json FILE``: the schema below, versioned by its ``schema`` field.
* ``--junit-xml FILE``: one ``testcase`` per spec and dtype, as CI servers read it.
* GitHub Actions annotations (``::error file=…,line=…::``), pointing at the failing line.

The JSON schema, ``gradverify.check/1``::

    {"schema": "gradverify.check/1", "version": "<verify's version>", "exit_code": 1,
     "settings": {"max_examples": 100, "dtypes": ["float64"], "seed": null, "derandomize": false,
                  "database": ".verify/examples", "order": 1, "modes": ["rev", "fwd"],
                  "sizes": {}, "time_budget": null},
     "summary": {"runs": 2, "passed": 1, "failed": 1},
     "runs": [{"path": "specs/a.vspec", "dtype": "float64",
               "verdict": "ok" | "mismatch" | "spec_error" | "unsupported" | "unchecked" | "inconclusive",
               "seconds": 0.8, "seed": 123, "checks": "values, VJPs, JVPs", "points": 310,
               "examples": 100, "time_budget_spent": false,
               "rejected": {"<reason>": 12}, "exact": {"judged by the exact pass": 3},
               "weak": {"∂o/∂x": {"weak": 2, "judged": 310}}, "warnings": [],
               "claims": [{"text": "...", "line": 4, "status": "..."}],
               "line": 4, "column": null, "message": "<the report>", "reproduce": "verify check ...",
               "failure": null | {"check": "gradient", "subject": "∂o/∂x", "formula": "...",
                                  "sizes": {"n": 1}, "inputs": {"x": [1.0]}, "reference": [1.0],
                                  "actual": [2.0], "allowed": [1e-14], "blame": "", "notes": []}}]}

Numbers that are not finite appear as the strings "NaN", "Infinity" and "-Infinity", so the
file stays strict JSON. ``line`` is the spec line a failure points at, where there is one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from xml.etree import ElementTree

import numpy as np

SCHEMA = "gradverify.check/1"
VERDICTS = {"ok": "ok      ", "mismatch": "MISMATCH", "spec_error": "ERROR   ", "unsupported": "UNSUPPORTED",
            "unchecked": "UNCHECKED", "inconclusive": "INCONCLUSIVE"}


@dataclass
class Outcome:
    path: str
    dtype: str
    verdict: str  # a key of VERDICTS
    seconds: float
    result: object = None  # verify.Result, when the spec could be run
    error: object = None  # the VerifyError, for any verdict but "ok"

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

    @property
    def line(self) -> int | None:
        if self.verdict == "spec_error":
            return self.error.line
        failure = getattr(self.error, "failure", None)
        return failure.line if failure is not None else None

    @property
    def column(self) -> int | None:
        return self.error.column if self.verdict == "spec_error" else None


def outcome_of(path, dtype: str, check_arguments: dict) -> Outcome:
    """Check the spec file at ``path`` with ``verify.check(**check_arguments)``, and record
    what came of it."""
    import verify

    kinds = [(verify.SpecError, "spec_error"), (verify.Mismatch, "mismatch"),
             (verify.Unsupported, "unsupported"), (verify.Inconclusive, "inconclusive"),
             (verify.Unchecked, "unchecked")]
    started = time.perf_counter()
    try:
        result = verify.check(verify.load(path), **check_arguments)
    except verify.VerifyError as error:
        verdict = next(name for kind, name in kinds if isinstance(error, kind))
        return Outcome(str(path), dtype, verdict, time.perf_counter() - started, getattr(error, "result", None), error)
    return Outcome(str(path), dtype, "ok", time.perf_counter() - started, result)


# -- JSON --------------------------------------------------------------------------------------
def json_report(outcomes: list, settings, exit_code: int) -> str:
    passed = sum(o.passed for o in outcomes)
    document = {
        "schema": SCHEMA,
        "version": _version(),
        "exit_code": int(exit_code),
        "settings": asdict(settings),
        "summary": {"runs": len(outcomes), "passed": passed, "failed": len(outcomes) - passed},
        "runs": [_run_entry(o) for o in outcomes],
    }
    return json.dumps(_strict(document), indent=2, ensure_ascii=False)


def _run_entry(outcome: Outcome) -> dict:
    result = outcome.result
    failure = getattr(outcome.error, "failure", None)
    return {
        "path": outcome.path,
        "dtype": outcome.dtype,
        "verdict": outcome.verdict,
        "seconds": round(outcome.seconds, 3),
        "seed": result.seed if result else None,
        "checks": result.checks if result else None,
        "points": result.points if result else 0,
        "examples": result.examples if result else 0,
        "time_budget_spent": bool(result and result.budget_spent is not None),
        "rejected": dict(result.rejected) if result else {},
        "exact": dict(result.exact) if result else {},
        "weak": {check: {"weak": weak, "judged": judged} for check, (weak, judged) in result.weak.items()}
        if result else {},
        "warnings": result.warnings if result else [],
        "claims": [{"text": c.text, "line": c.line, "status": c.status} for c in result.claims] if result else [],
        "line": outcome.line,
        "column": outcome.column,
        "message": None if outcome.error is None else str(outcome.error),
        "reproduce": result.reproduce if result else None,
        "failure": None if failure is None else {
            "check": failure.check, "subject": failure.subject, "formula": failure.formula, "sizes": failure.sizes,
            "inputs": {name: np.asarray(v).tolist() for name, v in failure.inputs.items()},
            "reference": np.asarray(failure.reference, dtype=np.float64).tolist(),
            "actual": np.asarray(failure.actual, dtype=np.float64).tolist(),
            "allowed": np.asarray(failure.allowed, dtype=np.float64).tolist(),
            "blame": failure.blame, "notes": list(failure.notes), "error": failure.error},
    }


def _strict(value):
    """Non-finite floats as strings, tuples as lists: JSON that every parser accepts."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _version() -> str:
    try:
        return metadata.version("gradverify")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- JUnit XML ---------------------------------------------------------------------------------
def junit_xml(outcomes: list) -> str:
    failures = sum(o.verdict in ("mismatch", "unsupported", "unchecked", "inconclusive") for o in outcomes)
    errors = sum(o.verdict == "spec_error" for o in outcomes)
    total = f"{sum(o.seconds for o in outcomes):.3f}"
    suites = ElementTree.Element("testsuites", name="verify", tests=str(len(outcomes)), failures=str(failures),
                                 errors=str(errors), time=total)
    suite = ElementTree.SubElement(suites, "testsuite", name="verify check", tests=str(len(outcomes)),
                                   failures=str(failures), errors=str(errors), skipped="0", time=total)
    for outcome in outcomes:
        case = ElementTree.SubElement(suite, "testcase", classname=outcome.path, name=f"{outcome.path}[{outcome.dtype}]",
                                      file=outcome.path, time=f"{outcome.seconds:.3f}")
        if outcome.line is not None:
            case.set("line", str(outcome.line))
        if outcome.passed:
            ElementTree.SubElement(case, "system-out").text = outcome.result.summary()
            continue
        report = str(outcome.error)
        tag = "error" if outcome.verdict == "spec_error" else "failure"
        element = ElementTree.SubElement(case, tag, message=report.splitlines()[0], type=type(outcome.error).__name__)
        element.text = report
    ElementTree.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(suites, encoding="unicode") + "\n"


# -- GitHub Actions ----------------------------------------------------------------------------
def github_annotations(outcomes: list) -> list:
    """One ``::error`` workflow command per spec and dtype that did not pass."""
    lines = []
    for outcome in outcomes:
        if outcome.passed:
            continue
        place = [f"file={_escape_property(outcome.path)}"]
        if outcome.line is not None:
            place.append(f"line={outcome.line}")
        if outcome.column is not None:
            place.append(f"col={outcome.column}")
        title = f"verify: {outcome.verdict.replace('_', ' ')} ({outcome.dtype})"
        place.append(f"title={_escape_property(title)}")
        lines.append(f"::error {','.join(place)}::{_escape_data(str(outcome.error))}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
