"""The ``verify`` command: ``verify check PATH...`` and ``verify explain FILE``.

Exit codes are named below; a user error never prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2  # a malformed spec, a missing file, a bad option
EXIT_INTERNAL = 3  # a bug of verify itself

DTYPES = ("float64", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """A command line that cannot be carried out (not a spec error)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verify", description="Check torch autograd against sympy derivatives.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check spec files or directories of *.vspec files")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.add_argument("--max-examples", type=int, default=100, metavar="N",
                       help="Hypothesis examples per spec (each a batch of points; default 100)")
    check.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    check.add_argument("--dtype", choices=DTYPES, default="float64", help="dtype torch computes in")
    check.add_argument("--order", type=int, choices=(1, 2), default=1,
                       help="2 also checks Hessian-vector products (double backward, forward over reverse)")
    check.add_argument("--modes", default="rev,fwd", metavar="MODES",
                       help="comma-separated: rev (VJPs), fwd (JVPs); default rev,fwd")
    explain = commands.add_parser("explain", help="walk through a spec's example point node by node")
    explain.add_argument("path", metavar="FILE")
    explain.add_argument("--dtype", choices=DTYPES, default="float64")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "check":
            return _check(arguments)
        return _explain(arguments)
    except UsageError as error:
        print(f"verify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        return EXIT_USAGE
    except Exception:  # noqa: BLE001 - a bug of ours: say so, and keep the traceback for the report
        print("verify: internal error. This is a bug in verify; please report it with the spec and this "
              "traceback:", file=sys.stderr)
        traceback.print_exc()
        return EXIT_INTERNAL


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


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _check(arguments) -> int:
    import verify

    if arguments.max_examples < 1:
        raise UsageError("--max-examples must be at least 1")
    modes = tuple(m.strip() for m in arguments.modes.split(",") if m.strip())
    if not modes or any(m not in ("rev", "fwd") for m in modes):
        raise UsageError(f"--modes takes rev, fwd or rev,fwd; got {arguments.modes!r}")
    files = spec_files(arguments.paths)
    dtype = _dtype(arguments.dtype)
    reports, worst = [], EXIT_OK
    for path in files:
        try:
            result = verify.check(verify.load(path), max_examples=arguments.max_examples, seed=arguments.seed,
                                  dtype=dtype, order=arguments.order, modes=modes)
        except verify.VerifyError as error:
            verdict, why, exit_code = _verdict(error)
            print(f"{verdict} {path}" + (f": {why}" if why else ""))
            reports.append(str(error))
            worst = max(worst, exit_code)
        else:
            print(f"ok       {path}: {result.summary()}")
            for reason, count in sorted(result.rejected.items()):
                print(f"         rejected {count} point(s): {reason}")
    for report in reports:
        print()
        print(report)
    passed = len(files) - len(reports)
    print(f"\n{passed} passed, {len(reports)} failed")
    return worst


def _verdict(error) -> tuple:
    """(verdict, why, exit code) for a spec that did not pass; the first matching class wins."""
    import verify

    verdicts = [(verify.SpecError, "ERROR   ", "spec error", EXIT_USAGE),
                (verify.Mismatch, "MISMATCH", "", EXIT_MISMATCH),
                (verify.Unsupported, "UNSUPPORTED", "not every check asked for could run", EXIT_MISMATCH),
                (verify.Unchecked, "UNCHECKED", "no point could be checked", EXIT_MISMATCH)]
    return next((verdict, why, code) for kind, verdict, why, code in verdicts if isinstance(error, kind))


def _explain(arguments) -> int:
    import verify
    from verify.explain import explain

    try:
        print(explain(verify.load(arguments.path), _dtype(arguments.dtype)))
    except verify.SpecError as error:
        print(error)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
