"""The ``verify`` command: ``verify check PATH...``, ``verify explain FILE`` and ``verify trace MODULE:FUNCTION``.

Exit codes are named below; a user error never prints a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from enum import IntEnum
from pathlib import Path

from .outcomes import SCHEMA, VERDICTS, github_annotations, json_report, junit_xml, outcome_of
from .settings import DTYPES, add_arguments, from_arguments, words


class ExitCode(IntEnum):
    OK = 0  # every spec agrees in every dtype
    MISMATCH = 1  # a mismatch, a false claim, or a spec that could not be checked
    USAGE = 2  # a malformed spec, a missing file, a bad option
    INTERNAL = 3  # a bug of verify itself


EXIT_CODES = {"ok": ExitCode.OK, "mismatch": ExitCode.MISMATCH, "unsupported": ExitCode.MISMATCH,
              "unchecked": ExitCode.MISMATCH, "inconclusive": ExitCode.MISMATCH, "spec_error": ExitCode.USAGE}


class UsageError(Exception):
    """A command line that cannot be carried out (not a spec error)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verify", description="Check torch autograd against sympy derivatives.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check spec files or directories of *.vspec files")
    check.add_argument("paths", nargs="*", metavar="PATH")
    check.add_argument("--example", action="store_true",
                       help="check the seed example shipped with verify (x = [2, 4], y = x**2, o = sum(y) / 2)")
    add_arguments(check)
    check.add_argument("--json", metavar="FILE", help=f"write the verdicts as JSON (schema {SCHEMA})")
    check.add_argument("--junit-xml", metavar="FILE", help="write a JUnit XML report, one test case per spec and dtype")
    fuzz = commands.add_parser("fuzz", help="hunt for gradient bugs in torch with random specs from the op registry")
    fuzz.add_argument("--ops", help="comma-separated one-argument elementwise ops to compose (default: all of them)")
    fuzz.add_argument("--reach", choices=("registry", "elementwise"), default="registry",
                      help="registry (default): also reductions, axis-wise ops, where, matmul and the structural "
                      "and linear-algebra ops; elementwise: the --ops and + - * / only")
    fuzz.add_argument("--max-examples", type=int, default=200, metavar="N", help="specs per search round")
    fuzz.add_argument("--time", type=float, default=600.0, metavar="SECONDS", help="time budget (default 600)")
    fuzz.add_argument("--modes", default="rev,fwd", help="comma-separated: rev, fwd, order2 (default rev,fwd)")
    fuzz.add_argument("--paths", help="comma-separated AD paths: eager, compile, func.vjp, func.grad, func.jacrev, "
                      "func.jacfwd, func.vmap, func.hessian (default: all; func.hessian needs order2)")
    fuzz.add_argument("--dtype", choices=DTYPES, default="float64")
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--out", default="fuzz-findings", metavar="DIR",
                      help="where each finding's .vspec and standalone torch script go")
    explain = commands.add_parser("explain", help="walk through a spec's example point node by node")
    explain.add_argument("path", metavar="FILE")
    explain.add_argument("--dtype", choices=DTYPES, default="float64")
    trace = commands.add_parser("trace", help="trace a torch function into a spec, to review and commit")
    trace.add_argument("function", metavar="MODULE:FUNCTION",
                       help="a function (or nn.Module class, built without arguments) importable from the "
                            "current directory, e.g. refs:rmsnorm")
    trace.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                       help="an input's example shape, e.g. x=4,8 (repeat per input, in order); NAME=DIMS:int "
                            "for an integer input; x= for a scalar")
    trace.add_argument("--dtype", choices=DTYPES, default="float32", help="the float inputs' dtype (default "
                                                                          "float32; bfloat16 shows the casts)")
    trace.add_argument("--domain", action="append", default=[], metavar="NAME=LOW,HIGH",
                       help="an input's domain: an Interval for a float input, LOW <= k < HIGH for an integer one")
    trace.add_argument("--sizes", action="append", default=[], metavar="NAME=SYMBOLS",
                       help="names for an input's dims, e.g. x=b,n")
    trace.add_argument("-o", "--output", metavar="FILE", help="write the spec there instead of printing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "check":
            return _check(arguments)
        if arguments.command == "fuzz":
            return _fuzz(arguments)
        if arguments.command == "trace":
            return _trace(arguments)
        return _explain(arguments)
    except UsageError as error:
        print(f"verify: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        return ExitCode.USAGE
    except Exception:  # noqa: BLE001 - a bug of ours: say so, and keep the traceback for the report
        print("verify: internal error. This is a bug in verify; please report it with the spec and this "
              "traceback:", file=sys.stderr)
        traceback.print_exc()
        return ExitCode.INTERNAL


def spec_files(paths: list[str]) -> list[Path]:
    """The files named, and the *.vspec files under the directories named, in a stable order."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(path.rglob("*.vspec"))
            if not inside:
                raise UsageError(f"no *.vspec files under {raw}")
            found.extend(inside)
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"no such file or directory: {raw}")
    return found


def bundled_example() -> Path:
    """The seed example inside the installed package."""
    from importlib.resources import files

    return Path(str(files("verify.examples") / "backprop.vspec"))


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _check(arguments) -> int:

    settings = from_arguments(arguments)
    if settings.database is not None and Path(settings.database).exists() and not Path(settings.database).is_dir():
        raise UsageError(f"--database: not a directory: {settings.database}")
    if not arguments.paths and not arguments.example:
        raise UsageError("name spec files or directories to check, or --example for the bundled one")
    files = spec_files(arguments.paths) + ([bundled_example()] if arguments.example else [])
    runs = [(path, dtype) for path in files for dtype in settings.dtypes]
    progress = Progress(sys.stderr, len(runs))
    outcomes = []
    for path, dtype in runs:
        progress.show(f"{path} ({dtype})")
        outcome = outcome_of(path, dtype, settings.check_arguments(dtype))
        progress.clear()
        _print_verdict(outcome, len(settings.dtypes) > 1)
        outcomes.append(outcome)
    for outcome in outcomes:
        if not outcome.passed:
            print()
            print(outcome.error)
    passed = sum(o.passed for o in outcomes)
    print(f"\n{passed} passed, {len(outcomes) - passed} failed")
    exit_code = max((EXIT_CODES[o.verdict] for o in outcomes), default=ExitCode.OK)
    _write(arguments.json, lambda: json_report(outcomes, settings, exit_code))
    _write(arguments.junit_xml, lambda: junit_xml(outcomes))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for line in github_annotations(outcomes):
            print(line)
    return exit_code


def _print_verdict(outcome, name_dtype: bool) -> None:
    where = f"{outcome.path} ({outcome.dtype})" if name_dtype else outcome.path
    if outcome.passed:
        print(f"{VERDICTS['ok']} {where}: {outcome.result.summary()}", flush=True)
        for line in outcome.result.details():
            print(f"         {line}")
        return
    why = {"spec_error": "spec error", "unsupported": "not every check asked for could run",
           "unchecked": "no point could be checked", "inconclusive": "the checks could not decide"}.get(
        outcome.verdict)
    print(f"{VERDICTS[outcome.verdict]} {where}" + (f": {why}" if why else ""), flush=True)


def _write(path: str | None, render) -> None:
    if path is None:
        return
    try:
        Path(path).write_text(render(), encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None


class Progress:
    """A status line for long runs, on a terminal only: elsewhere (CI logs) the verdict lines
    are the progress, and no control characters are written."""

    def __init__(self, stream, total: int):
        self.stream = stream
        self.total = total
        self.done = 0
        self.live = total > 1 and stream.isatty()

    def show(self, what: str) -> None:
        self.done += 1
        if self.live:
            self.stream.write(f"\r\x1b[K[{self.done}/{self.total}] checking {what}")
            self.stream.flush()

    def clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _fuzz(arguments) -> int:
    """Exit 0 when the run found nothing, 1 when it found something (each saved under --out)."""
    from verify.fuzz import PATHS, fuzz, fuzzable_ops, save

    ops = _chosen("--ops", arguments.ops, fuzzable_ops())
    kinds = _chosen("--modes", arguments.modes, ("rev", "fwd", "order2"))
    modes = tuple(m for m in ("rev", "fwd") if m in kinds) or ("rev",)
    paths = _chosen("--paths", arguments.paths, PATHS)
    out = Path(arguments.out)
    count = 0

    def report(finding):
        nonlocal count
        count += 1
        spec_path, script_path = save(finding, out, count, _dtype(arguments.dtype))
        print(f"finding {count} ({finding.kind}): {finding.check} along {finding.path}; ops {', '.join(finding.ops)}",
              flush=True)
        print(f"  {spec_path}" + (f"\n  {script_path}" if script_path else ""), flush=True)

    if "compile" in paths:
        from verify.fuzz import compile_backend

        print(f"compile path: torch.compile with {compile_backend()[1]}", flush=True)
    specs = 0

    def counted(_):
        nonlocal specs
        specs += 1

    started = time.monotonic()
    fuzz(ops=list(ops), max_examples=arguments.max_examples, seconds=arguments.time, paths=paths,
         order=2 if "order2" in kinds else 1, modes=modes, dtype=_dtype(arguments.dtype), seed=arguments.seed,
         on_finding=report, reach=arguments.reach, on_spec=counted)
    print(f"\n{count} finding(s); {specs} spec(s) checked along {len(paths)} path(s) in {time.monotonic() - started:.0f} s")
    return ExitCode.MISMATCH if count else ExitCode.OK


def _chosen(option: str, text: str | None, known) -> tuple:
    """The names listed in ``text`` (all of ``known`` when it is not given), each one of ``known``."""
    if text is None:
        return tuple(known)
    names = tuple(words(text))
    if not names or set(names) - set(known):
        raise UsageError(f"{option} takes {', '.join(known)}; got {text!r}")
    return names


def _explain(arguments) -> int:
    import verify
    from verify.explain import explain

    try:
        print(explain(verify.load(arguments.path), _dtype(arguments.dtype)))
    except verify.SpecError as error:
        print(error)
        return ExitCode.USAGE
    return ExitCode.OK


def _trace(arguments) -> int:
    import importlib

    import torch

    import verify

    module_name, _, attribute = arguments.function.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"name the function as MODULE:FUNCTION, e.g. refs:rmsnorm (got {arguments.function!r})")
    sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"cannot import {arguments.function}: {error}") from None
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        target = target()
    inputs, sizes, domains = [], {}, {}
    for given in arguments.shape:
        name, dims, kind = _named(given, "--shape")
        shape = tuple(int(d) for d in dims.split(",") if d.strip()) if dims.strip() else ()
        inputs.append(torch.zeros(shape, dtype=torch.int64) if kind == "int"
                      else torch.randn(shape, dtype=_dtype(arguments.dtype)))
    for given in arguments.sizes:
        name, symbols, _ = _named(given, "--sizes")
        sizes[name] = tuple(s.strip() for s in symbols.split(","))
    for given in arguments.domain:
        name, bounds, _ = _named(given, "--domain")
        try:
            low, high = (float(b) for b in bounds.split(","))
        except ValueError:
            raise UsageError(f"--domain takes NAME=LOW,HIGH, e.g. x=-100,100 (got {given!r})") from None
        domains[name] = (int(low) if low.is_integer() else low, int(high) if high.is_integer() else high)
    try:
        text = verify.spec_from(target, *inputs, sizes=sizes, domains=domains).source
    except verify.SpecError as error:
        print(error, file=sys.stderr)
        return ExitCode.USAGE
    if arguments.output:
        Path(arguments.output).write_text(text)
        print(f"wrote {arguments.output}")
    else:
        print(text, end="")
    return ExitCode.OK


def _named(given: str, flag: str) -> tuple:
    """NAME=VALUE[:KIND] -> (name, value, kind)."""
    name, equals, value = given.partition("=")
    if not equals or not name.strip():
        raise UsageError(f"{flag} takes NAME=VALUE (got {given!r})")
    value, _, kind = value.partition(":")
    if kind not in ("", "int"):
        raise UsageError(f"{flag}: the only kind is :int (got {kind!r})")
    return name.strip(), value, kind


if __name__ == "__main__":
    sys.exit(main())
