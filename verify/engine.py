"""The engine: let Hypothesis drive batches of points through both sides of a spec's plan.

``run`` has ``verify.plan`` do the sympy work once, draws examples, has ``verify.checks``
evaluate the reference and torch on each batch and compare them, and turns the shrunk
counterexample into a ``Mismatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase

from .checks import KINKS, Options, evaluate, failure_notes
from .errors import Inconclusive, Mismatch, SpecError, Unchecked, Unsupported
from .ir import Spec
from .layouts import CHOICES
from .plan import claim_text, example_point, needs_concrete_sizes, plan
from .report import CHECKED, REFUTED, ClaimResult, Failure, Result, proved
from .settings import MODES, stable_seed
from .strategies import (BATCHED, PER_POINT, ROWS, Example, check_given_sizes, draws_by_seed_alone, examples,
                         simplest_example)
from .subject import FunctionSubject, ModeUnsupported, function_name
from .tolerance import UNIT_ROUNDOFF


def _validated_budget(time_budget) -> float | None:
    if time_budget is None:
        return None
    if isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or not (
            math.isfinite(time_budget) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds; got {time_budget!r}")
    return float(time_budget)


def _probed(subject: FunctionSubject, spec: Spec, options: Options, sizes: dict, name: str, result: Result) -> None:
    """Call the function once before drawing: a call that cannot work, or a mode it does not
    implement, is the caller's error, not a failed check."""
    point = example_point(spec, options.dtype)
    if point is None or not sizes.items() <= point.sizes.items():
        point = simplest_example(spec, options.dtype, sizes)
    try:
        subject.probe(point, options.dtype, options.modes)
    except ModeUnsupported as unsupported:
        if options.modes == (unsupported.mode,):
            return  # nothing else asked for: the values are checked, and the result says the mode is unsupported
        other = "rev" if unsupported.mode == "fwd" else "fwd"
        raise Unsupported(f"{name}: {unsupported.mode} mode is not supported: {unsupported} (pass "
                          f"modes=(\"{other}\",) to check {'reverse' if other == 'rev' else 'forward'} mode only)",
                          result) from None


def _validated(dtype, order, modes, device, kinks="any", rtol=0.0, atol=0.0, compute_dtype=None) -> Options:
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError("dtype must be one of torch.float64, torch.float32, torch.bfloat16, torch.float16; "
                         f"got {dtype}")
    if compute_dtype is not None and (compute_dtype not in UNIT_ROUNDOFF
                                      or UNIT_ROUNDOFF[compute_dtype] > UNIT_ROUNDOFF[dtype]):
        raise ValueError(f"compute_dtype must be a dtype at least as precise as dtype ({dtype}); got {compute_dtype}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}; got {modes!r}")
    if kinks not in KINKS:
        raise ValueError(f"kinks must be one of {KINKS}; got {kinks!r}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number, at least 0; got {value!r}")
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as error:  # torch's way of saying the device is not built in or absent
        raise ValueError(f"device {device!r} is not available here: {str(error).strip().splitlines()[0]}") from None
    return Options(dtype, order, modes, str(torch.device(device)), kinks, float(rtol), float(atol),
                   None if compute_dtype == dtype else compute_dtype)


class _BudgetSpent(BaseException):
    """Raised inside the Hypothesis test when the time budget is spent: a BaseException, so
    that Hypothesis stops at once instead of shrinking it as a failure."""


class _ShrinkingEnded(BaseException):
    """Raised inside the Hypothesis test when shrinking has taken SHRINK_SECONDS: the smallest
    failure found so far is reported."""


# Past this, shrinking stops: a value that must stay delicate (a tie in float32) can keep
# Hypothesis's shrinker busy for minutes, mostly in its own bookkeeping.
SHRINK_SECONDS = 20.0


class _OutOfMemory(BaseException):
    """Raised inside the Hypothesis test where a batch ran out of memory, a BaseException for
    the same reason; it carries the batch's sizes and points."""

    def __init__(self, example: Example):
        self.sizes, self.points = example.sizes, example.batch


class _Counterexample(Exception):
    """Raised inside the Hypothesis test so that Hypothesis shrinks the example."""

    def __init__(self, failure: Failure, drawn: bool = True, shrinking_ended: bool = False):
        self.failure = failure
        self.drawn = drawn  # by Hypothesis, not the spec's example point
        self.shrinking_ended = shrinking_ended
        super().__init__(failure.subject)


def run(spec: Spec, *, fn=None, max_examples: int = 100, seed: int | None = None, dtype: torch.dtype = torch.float64,
        order: int = 1, modes=MODES, device: str = "cpu", database: str | Path | None = None,
        derandomize: bool = False, sizes: dict | None = None, kinks: str = "any", rtol: float = 0.0,
        atol: float = 0.0, time_budget: float | None = None, compute_dtype: torch.dtype | None = None,
        rows: bool = False, require_power: bool = False, layouts: str = "drawn") -> Result:
    """Check ``spec``'s torch lowering, or ``fn``, on Hypothesis-drawn batches of points and
    on the spec's example point.

    With ``database`` (a directory), failing examples are kept there and replayed first by
    the next run of the same spec, function and dtype. ``derandomize`` derives the seed from
    the spec text when none is given. ``sizes`` fixes size symbols (``{"n": 1000}``); the
    others are drawn. With ``time_budget`` (seconds, planning included), no new example is
    drawn once it is spent, unless a failure is being shrunk; ``Result.budget_spent`` says so.
    With ``require_power``, a run whose checks are mostly weak, rejected or unjudged
    (``Result.weakly_covered``) raises ``Inconclusive``. ``fn`` is handed its inputs and
    cotangents in memory layouts drawn per example (``verify.layouts``) where ``layouts`` is
    "drawn".
    """
    __tracebackhide__ = True
    if layouts not in CHOICES:
        raise ValueError(f"layouts is one of {', '.join(CHOICES)}, not {layouts!r}")
    options = _validated(dtype, order, modes, device, kinks, rtol, atol, compute_dtype)
    time_budget = _validated_budget(time_budget)
    started = time.perf_counter()
    sizes = _validated_sizes(spec, sizes)
    if seed is None:
        seed = stable_seed(spec.source, options.dtype_name) if derandomize else random.SystemRandom().randrange(2**31)
    name = spec.path or "<spec>"
    reproduce = _reproduce_line(spec, fn, seed, options, sizes, rows)
    result = Result(name, options.dtype_name, seed, modes=options.modes, order=options.order, reproduce=reproduce,
                    claims=[ClaimResult(claim_text(c), c.loc.line) for c in spec.claims])
    rejected = Counter()
    if not needs_concrete_sizes(spec):
        plan(spec)  # the sympy work happens here, before any example
    subject = None if fn is None else FunctionSubject(spec, fn, options.device, rows)
    tangents = "fwd" in options.modes or options.order == 2
    if subject is not None:
        _probed(subject, spec, options, sizes, name, result)

    kept = None if database is None else DirectoryBasedExampleDatabase(str(database))
    key = _database_key(spec, fn, options, sizes)
    replayable = 0 if kept is None else len(list(kept.fetch(key)))
    calls, first_failing_call, first_failure, latest_failure, found_at = 0, None, None, None, 0.0
    shrinking = dataclasses.replace(options, provisional=True)

    def agrees(example):
        nonlocal calls, first_failing_call, first_failure, latest_failure, found_at
        if (time_budget is not None and calls and first_failing_call is None
                and time.perf_counter() - started > time_budget):
            raise _BudgetSpent
        if first_failure is not None and time.perf_counter() - found_at > SHRINK_SECONDS:
            raise _ShrinkingEnded
        calls += 1
        if "dtype" in result.unsupported:
            return
        if first_failure is None:
            result.examples += 1  # the examples drawn, as asked for; not the shrinker's tries nor the example point
        checking = options if first_failure is None else shrinking
        try:
            failure = evaluate(plan(spec, example.sizes), subject, example, checking, result, rejected)
        except MemoryError:
            raise _OutOfMemory(example) from None
        # While shrinking, the first failure is known to be real alone; the shrunk one is confirmed alone at the end.
        if failure is not None and first_failure is None and _only_under_vmap(spec, subject, failure, options):
            subject.call_one_by_one("its vmapped results disagreed with the spec at a point where a call alone agrees")
            failure = evaluate(plan(spec, example.sizes), subject, example, checking, result, rejected)
        if failure is not None:
            if first_failure is None:
                first_failing_call, first_failure, found_at = calls, failure, time.perf_counter()
            latest_failure = failure  # the shrinker tries only candidates simpler than its best
            raise _Counterexample(failure)

    budget = BATCHED if subject is None else ROWS if rows else PER_POINT
    drawn_layouts = subject is not None and layouts == "drawn"
    test = given(examples(spec, options.dtype, sizes=sizes, tangents=tangents, budget=budget,
                          layouts=drawn_layouts))(agrees)
    # Hypothesis keys kept examples by the test function's source, the same for every spec.
    test._hypothesis_internal_database_key = key
    # No explain phase: it reruns a failing example many times over to annotate Hypothesis's
    # own report, which verify replaces with its own.
    test = settings(max_examples=max_examples, database=kept, deadline=None, report_multiple_bugs=False,
                    verbosity=Verbosity.quiet, phases=[p for p in Phase if p is not Phase.explain],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(hypothesis_seed(seed)(test))
    try:
        try:
            with draws_by_seed_alone():
                test()
        except _BudgetSpent:
            result.budget_spent = time_budget
        except _ShrinkingEnded:
            raise _Counterexample(latest_failure, shrinking_ended=True) from None
        except _OutOfMemory as out:
            # The SpecError would hold this exception, and through its traceback and context the
            # failed batch's frames and arrays: a CLI run would carry them into the next spec.
            out.__traceback__ = out.__context__ = None
            at = f" at {', '.join(f'{k} = {v}' for k, v in out.sizes.items())}" if out.sizes else ""
            raise SpecError(f"a batch of {out.points} point(s){at} ran out of memory: declare smaller tensors, or "
                            "give the check more memory", path=spec.path) from None
        point = example_point(spec, options.dtype, tangents)
        if point is not None and sizes.items() <= point.sizes.items() and "dtype" not in result.unsupported:
            failure = evaluate(plan(spec, point.sizes), subject, point, options, result, rejected)
            if failure is not None:
                failure.notes.append("at the example point given in the spec")
                raise _Counterexample(failure, drawn=False)
    except _Counterexample as found:
        # The example point is kept as the spec gives it; a drawn one is confirmed (it may have
        # been judged provisionally while shrinking) and made simpler.
        failure = found.failure
        if found.drawn:
            failure = _simplified(spec, subject, _confirmed(spec, subject, failure, first_failure, options), options)
        if failure.point is not None:
            failure.notes.extend(failure_notes(plan(spec, failure.point.sizes), failure, options.model, subject is None))
        if found.shrinking_ended:
            failure.notes.append(f"shrinking stopped after {SHRINK_SECONDS:g} s: this is the smallest failure "
                                 "found by then, maybe not the smallest there is")
        for claim in result.claims:
            if failure.claim == claim.text:
                claim.status = REFUTED
        if first_failing_call is not None and first_failing_call <= replayable:
            failure.notes.append(f"found first by replaying an example kept in {database}")
        _record_tallies(result, subject, rejected)
        raise Mismatch(failure.render(name, reproduce), failure, result) from None
    _record_tallies(result, subject, rejected)
    if result.unsupported:
        reasons = "; ".join(f"{mode}: {reason}" for mode, reason in result.unsupported.items())
        hint = (' (pass modes=("rev",) to check reverse mode only)' if "fwd" in result.unsupported else
                ' (pass modes=("fwd",) to check forward mode only)' if "rev" in result.unsupported else "")
        raise Unsupported(f"{name}: not everything asked for could be checked: {reasons}{hint}", result)
    if result.inconclusive:
        raise Inconclusive(f"{name}: inconclusive at {result.inconclusive} point(s): float64's bounds were sure of a "
                           "disagreement that the exact pass could not decide (see verify.oracle.exact_point)", result)
    if result.points == 0:
        reasons = "; ".join(f"{count} {reason}" for reason, count in rejected.most_common(3)) or "none drawn"
        raise Unchecked(f"{name}: no point could be checked: every point was rejected ({reasons})", result)
    if require_power and result.weakly_covered():
        raise Inconclusive(f"{name}: the checks say little: " + "; ".join(result.weakly_covered()), result)
    for claim in result.claims:
        symbols = [] if needs_concrete_sizes(spec) else spec.size_symbols
        claim.status = (proved(symbols) + (" at every size checked" if symbols != spec.size_symbols else "")
                        if claim.proved else f"{CHECKED} ({claim.unproved})")
    return result


def _confirmed(spec: Spec, subject, shrunk: Failure, first: Failure, options: Options) -> Failure:
    """The shrunk failure as the exact pass judges it at its point; the first failure found
    (judged in full) in the rare case that the exact pass clears the shrunk one."""
    if shrunk.point is None or shrunk is first:
        return shrunk
    confirmed = _failure_alone(spec, subject, shrunk.point, options)
    return first if confirmed is None else confirmed


def _only_under_vmap(spec: Spec, subject, failure: Failure, options: Options) -> bool:
    """Whether a user's function, called by vmap, failed at a point where a call alone (the
    eager way) agrees: then its batching differs, and it is checked one point at a time."""
    if subject is None or not subject.vmapped() or failure.point is None:
        return False
    return _failure_alone(spec, subject, failure.point, options) is None


def _failure_alone(spec: Spec, subject, point: Example, options: Options) -> Failure | None:
    """The Failure at ``point`` judged on its own (its counts kept out of the run's result)."""
    scratch = Result("", options.dtype_name, 0, modes=options.modes, order=options.order)
    return evaluate(plan(spec, point.sizes), subject, point, options, scratch, Counter())


def _record_tallies(result: Result, subject, rejected: Counter) -> None:
    """The rejections by reason, and how a user's function was called, into ``result``."""
    result.rejected = dict(rejected)
    if subject is not None:
        result.calls = dict(subject.routes)


def _validated_sizes(spec: Spec, sizes: dict | None) -> dict:
    sizes = dict(sizes or {})
    for name, value in sizes.items():
        if name not in spec.size_symbols:
            known = ", ".join(spec.size_symbols) or "none"
            raise ValueError(f"sizes: {name!r} is not a size symbol of the spec (its size symbols: {known})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sizes: {name} must be a positive int; got {value!r}")
    check_given_sizes(spec, sizes)
    return sizes


def _database_key(spec: Spec, fn, options: Options, sizes: dict) -> bytes:
    """What a kept example belongs to: the spec text, the function checked, the dtype and the
    fixed sizes."""
    subject = "" if fn is None else function_name(fn)
    return hashlib.sha256(f"{spec.source}\0{subject}\0{options.dtype_name}\0{sorted(sizes.items())}".encode()).digest()


def _reproduce_line(spec: Spec, fn, seed: int, options: Options, sizes: dict, rows: bool = False) -> str:
    extras = [] if options.dtype == torch.float64 else [f"dtype=torch.{options.dtype_name}"]
    if sizes:
        extras.append(f"sizes={sizes!r}")
    if options.order != 1:
        extras.append(f"order={options.order}")
    if options.modes != MODES:
        extras.append(f"modes={options.modes!r}")
    if fn is not None:
        extras += [f"kinks={options.kinks!r}"] if options.kinks != "any" else []
        extras += [f"{name}={value!r}" for name, value in (("rtol", options.rtol), ("atol", options.atol)) if value]
        extras += [f"compute_dtype=torch.{str(options.compute_dtype)[6:]}"] if options.compute_dtype else []
        extras += ["rows=True"] if rows else []
        extras += getattr(fn, "reproduce_arguments", [])  # a module's bindings, a tuple's outputs
        return f"verify.check_function({function_name(fn)}, spec, seed={seed}" + "".join(
            f", {e}" for e in extras) + ")"
    if spec.path:
        flags = "" if options.dtype == torch.float64 else f" --dtype {options.dtype_name}"
        flags += "" if options.order == 1 else f" --order {options.order}"
        flags += "" if options.modes == MODES else f" --modes {','.join(options.modes)}"
        flags += "" if not sizes else " --sizes " + ",".join(f"{k}={v}" for k, v in sizes.items())
        return f"verify check {spec.path} --seed {seed}{flags}"
    return f"verify.check(spec, seed={seed}" + "".join(f", {e}" for e in extras) + ")"


# Values a failing point's elements are tried at, simplest first, when Hypothesis could not
# shrink the point itself (it came from a materialized bulk of points).
SIMPLER_VALUES = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 10.0, -10.0)
SIMPLIFIED_ELEMENTS = 64
SIMPLIFY_SECONDS = 2.0


def _simplified(spec: Spec, subject, failure: Failure, options: Options) -> Failure:
    """The failure at a point whose elements are each as simple as still shows it: tried at
    SIMPLER_VALUES and at the value rounded to fewer digits (those inside the input's
    domain), and directions at 1."""
    point = failure.point
    if point is None:
        return failure
    arrays = {**point.inputs, "cotangent": point.cotangent,
              **{f"tangent of {name}": t for name, t in (point.tangents or {}).items()}}
    if sum(a.size for a in arrays.values()) > SIMPLIFIED_ELEMENTS:
        return failure
    deadline = time.monotonic() + SIMPLIFY_SECONDS

    def still_fails(candidate: Example) -> Failure | None:
        found = _failure_alone(spec, subject, candidate, options)
        return found if found is not None and (found.check, found.subject) == (failure.check, failure.subject) else None

    for name, array in arrays.items():
        for element in np.ndindex(array.shape):
            current = float(array[element])
            direction = name == "cotangent" or name.startswith("tangent of ")
            for candidate in ((1.0,) if direction else _simpler(current, options.dtype)):
                if candidate == current or time.monotonic() > deadline:
                    break  # candidates come simplest first: none after the current value is simpler
                if not direction and not _inside(spec.inputs[name], candidate, point.sizes):
                    continue  # a failure is shown only at a point its inputs' domains allow
                trial = {k: a.copy() for k, a in arrays.items()}
                trial[name][element] = candidate
                example = Example(point.sizes, {n: trial[n] for n in point.inputs}, trial["cotangent"],
                                  {n: trial[f"tangent of {n}"] for n in point.tangents} if point.tangents else None)
                found = still_fails(example)
                if found is not None:
                    arrays, failure = trial, found
                    break
    return failure


def _inside(declared, value: float, sizes: dict) -> bool:
    if declared.integer:
        low, high = declared.domain.bounds(sizes)
        return value == int(value) and low <= value < high
    return declared.domain.contains(value)


def _simpler(value: float, dtype: torch.dtype) -> list:
    rounded = [float(f"{value:.{digits}g}") for digits in (1, 2, 3)]
    return [float(torch.tensor(c, dtype=dtype)) for c in (*SIMPLER_VALUES, float(round(value)), *rounded)]


