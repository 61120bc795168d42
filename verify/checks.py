"""The checks of one batch: the reference and torch on the same points, compared.

``evaluate`` runs a batch in up to three passes, each on the points the one before could not
settle: float64 without error bounds, float64 with them, and the exact pass in arb balls.
Which points are judged, and which rejected, is ``verify.acceptance``'s business.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import sympy
import torch

from . import acceptance, balls, findings, layouts
from .ir import Apply, Ref, Spec, concrete_shape
from .lower.sympy import TANGENT_PREFIX, Tensor, adjoint_name, tangent_name
from .ops import REGISTRY
from .oracle import ReferenceSide, exact_point, exact_values, reference_derivatives, reference_values, restricted
from .report import COTANGENT_NAME, Failure, Result, readable, reproduction_snippet
from .settings import MODES
from .strategies import Example
from .subject import CodeFailure, FunctionSubject, ModeUnsupported, SpecSubject
from .tolerance import Precision, overflows, precision, smallest_subnormal

if TYPE_CHECKING:
    from .plan import Plan

CLAIMS = precision(torch.float64)  # a claim compares two formulas of the float64 reference
# Points of one batch that the exact pass judges beyond those it must (float64's sure
# disagreements, torch not finite): it runs element by element in Python.
EXACT_POINTS = 8
# ... and of large points fewer, within this many input elements (one at least): arb's cost grows
# with the elements, and a 64 x 64 matrix costs as much as a few hundred scalars.
EXACT_ELEMENTS = 2**10


@dataclass(frozen=True)
class Options:
    """What one run checks, and where."""

    dtype: torch.dtype = torch.float64
    order: int = 1
    modes: tuple = MODES
    device: str = "cpu"
    kinks: str = "any"  # at an exact kink, a user's function may take "any" one-sided derivative, or "torch"'s
    # An extra allowance, for code that knowingly trades accuracy: rtol * |reference| + atol.
    rtol: float = 0.0
    atol: float = 0.0
    # A kernel that stores ``dtype`` but computes in a wider dtype (verify.tolerance's compute-dtype rule).
    compute_dtype: torch.dtype | None = None
    # While a failure is shrunk: a disagreement float64's bounds are sure of is reported
    # without the exact pass, which then confirms only the shrunk failure.
    provisional: bool = False

    @property
    def slack(self) -> tuple:
        return self.rtol, self.atol

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def model(self) -> Precision:
        """How the code under test rounds: the allowance's model (``verify.tolerance``)."""
        return precision(self.dtype, self.compute_dtype)


@dataclass
class TorchSide:
    """What torch computed on a batch: values, VJPs, the JVP and, per way, the HVPs. A check
    whose call raised holds the Failure that reports it, in place of its arrays."""

    values: dict
    gradients: dict
    jvp: np.ndarray | Failure | None = None
    hvps: dict = field(default_factory=dict)  # way -> (input name -> array) or Failure

    def complete(self) -> bool:
        """Whether every call returned (none holds a Failure)."""
        return not isinstance(self.jvp, Failure) and not any(isinstance(p, Failure) for p in self.hvps.values())

    def finite(self) -> np.ndarray:
        """Per point, whether every array torch returned is finite there."""
        arrays = [*self.values.values(), *self.gradients.values(), *([self.jvp] if self.jvp is not None else []),
                  *(array for products in self.hvps.values() for array in products.values())]
        batch = len(arrays[0])
        return np.logical_and.reduce([np.isfinite(a.reshape(batch, -1)).all(axis=1) for a in arrays])

    def at(self, keep: np.ndarray) -> TorchSide:
        if keep.all():
            return self

        def kept(entry):
            if isinstance(entry, dict):
                return {name: kept(array) for name, array in entry.items()}
            return entry[keep] if isinstance(entry, np.ndarray) else entry

        return TorchSide(kept(self.values), kept(self.gradients), kept(self.jvp), kept(self.hvps))


def _torch_side(prepared: Plan, subject, at: Example, options: Options, result: Result):
    """Everything torch computes on ``at`` for the checks asked, or None when the dtype is
    unsupported. A raised call gives the Failure that reports it: in place of the whole side
    for the first call (values and VJPs), in place of its arrays for the JVP and HVPs."""
    spec, dtype = prepared.spec, options.dtype
    value_shapes = {name: concrete_shape(ref.tensor.shape, at.sizes) for name, ref in prepared.values.items()
                    if isinstance(subject, SpecSubject) or name == spec.output}
    gradient_shapes = {name: concrete_shape(ref.tensor.shape, at.sizes) for name, ref in prepared.gradients.items()
                       if "rev" in options.modes and "rev" not in result.unsupported
                       and (isinstance(subject, SpecSubject) or name in spec.inputs)}
    try:
        values, gradients, _ = subject.reverse(at, value_shapes, gradient_shapes, dtype)
    except ModeUnsupported as unsupported:
        result.unsupported[unsupported.mode] = str(unsupported)
        if unsupported.mode == "dtype":
            return None
        return _torch_side(prepared, subject, at, options, result)  # the rest, without the backward
    except CodeFailure as failed:
        return _code_failure(failed, subject, at, options)
    side = TorchSide(values, gradients)
    if "fwd" in options.modes and "fwd" not in result.unsupported:
        try:
            side.jvp = subject.forward(at, dtype)
        except ModeUnsupported as unsupported:
            result.unsupported["fwd"] = str(unsupported)
        except CodeFailure as failed:
            side.jvp = _code_failure(failed, subject, at, options)
    if options.order == 2:
        ways = [("rev-over-rev", False)] if "rev" in options.modes and "rev" not in result.unsupported else []
        if "fwd" in options.modes and "fwd-over-rev" not in result.unavailable:
            ways.append(("fwd-over-rev", True))
        for way, over_forward in ways:
            try:
                side.hvps[way] = subject.second(at, dtype, over_forward)
            except ModeUnsupported as unsupported:
                result.unavailable[way] = str(unsupported)
            except CodeFailure as failed:
                side.hvps[way] = _code_failure(failed, subject, at, options)
    return side


@dataclass
class _Comparison:
    """One check of a batch: a reference (value, error bound or its floor) against an array of the same shape."""

    check: str
    subject: str
    label: str  # its name in the rules of ``verify.acceptance``
    reference: tuple
    actual: np.ndarray
    formula: tuple  # (its label, its Tensor): printed only for a failure, as sympy prints slowly
    line: int | None
    model: Precision  # the code's; claims compare two float64 formulas
    tangents: bool = False  # the failing point is shown with its tangents
    details: dict = field(default_factory=dict)
    slack: tuple = (0.0, 0.0)  # the options' (rtol, atol); claims compare two formulas and get none
    # The bound covers the float64 reference's own error (a claim's two formulas'), so no
    # distance is left to the exact pass for it.
    own_included: bool = False


def _comparisons(prepared: Plan, subject, reference: ReferenceSide, actual: TorchSide, model: Precision,
                 slack: tuple = (0.0, 0.0)):
    """Every check of a batch, in the order a failure is reported; a raised call's Failure where
    its check would be."""
    spec = prepared.spec
    output = spec.output
    for name, array in actual.values.items():
        yield _Comparison("value", f"the value of {name}", f"the value of {name}", reference.values[name], array,
                          (name, prepared.values[name].tensor), _line(spec, name), model, slack=slack)
    for name in _backward_order(spec, actual.gradients):
        blame = _blame(spec, name) if isinstance(subject, SpecSubject) else ""
        yield _Comparison("gradient", f"∂{output}/∂{name}", f"∂{output}/∂{name}", reference.gradients[name],
                          actual.gradients[name],
                          (f"∂{output}/∂{name}", prepared.gradients[name].tensor), _line(spec, name), model,
                          details={"blame": blame}, slack=slack)
    for claim, ((claimed, claimed_error), (derivative, error)) in zip(prepared.claims, reference.claimed):
        label = f"∂{output}/∂{claim.wrt}" if claim.kind == "grad" else f"∂²{output}/∂{claim.wrt}²"
        with np.errstate(over="ignore"):  # two float64 formulas, each off by its own rounding, four times over
            both = (claimed_error + error) / min(model.kernel_ratio, 1.0) + np.abs(claimed) + np.abs(derivative)
        yield _Comparison("claim", f"{claim.kind}({output}, {claim.wrt})", f"the claimed {claim.kind} of {claim.wrt}",
                          (derivative, 4 * both), claimed,
                          (label, claim.formula), claim.line, CLAIMS, own_included=True,
                          details={"reference_label": "derivative", "actual_label": "claimed", "claim": claim.text})
    if isinstance(actual.jvp, Failure):
        yield actual.jvp
    elif actual.jvp is not None:
        yield _Comparison("JVP", f"the JVP of {output}", f"the JVP of {output}", reference.jvp, actual.jvp,
                          (f"JVP of {output}", prepared.forward_mode()[output].tensor), _line(spec, output), model,
                          tangents=True, slack=slack)
    for way, products in actual.hvps.items():
        if isinstance(products, Failure):
            yield products
            continue
        for name, array in products.items():
            yield _Comparison("HVP", f"the Hessian-vector product of {name} ({way})",
                              f"the Hessian-vector product of {name}", reference.hvps[name], array,
                              (f"HVP of {name}", prepared.second_order()[name].tensor), _line(spec, name), model,
                              tangents=True, slack=slack)


def evaluate(prepared: Plan, subject, example: Example, options: Options, result: Result, rejected: Counter):
    """Compare both sides on one batch of ``prepared``'s spec; returns the first Failure, or
    None when all agree.

    ``subject`` is a FunctionSubject, or None for the spec's own torch lowering.

    Three passes, each taking the points the one before could not settle. The reference is
    first evaluated in float64 without its error bounds, and points where torch agrees with
    it within the tolerance of a floor of those bounds (tighter than the bounds allow) are
    checked at that. The bounds then pass, fail or reject the other points, by the rules of
    ``verify.acceptance``. Where float64 cannot tell (a step of a formula overflowed, a
    disagreement within the reference's own error of the allowance), the exact pass decides.
    """
    subject = subject or prepared.subject.on(options.device)
    forward = "fwd" in options.modes and "fwd" not in result.unsupported
    for claim, status in zip(prepared.claims, result.claims):
        status.unproved = status.unproved or claim.unproved
    ctx, values = reference_values(prepared, example, options.model, bounded=False)
    inside, doubtful = acceptance.inside_domains(prepared, example, values, rejected, how="floor")
    keep, unsure = acceptance.accepted_points(example.batch, options.model, rejected, inside,
                                              _value_checks(prepared, subject, values), how="floor")
    # A NaN value is undefined math or a step that overflowed: only the bounds tell which, and
    # torch runs there only where they accept the point.
    undecided = doubtful | unsure | keep & _any_nan(values, example.batch)
    keep &= ~undecided
    closely = []  # (points, torch's side there or None) for the bounds to judge
    checked = 0
    if keep.any():
        at = example.at(keep)
        actual = _torch_side(prepared, subject, at, options, result)
        if actual is None:
            return None
        if isinstance(actual, Failure) or not actual.complete():
            # A call raised, maybe at a point the bounds reject: torch runs again on the points they accept.
            closely.append((at, None))
        else:
            estimate = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order,
                                                                    forward, bounded=False))
            confirmed = np.ones(at.batch, dtype=bool)
            judged = []
            for comparison in _comparisons(prepared, subject, restricted(estimate, keep), actual, options.model,
                                           options.slack):
                agree, allowed = acceptance.agreeing(*comparison.reference, comparison.actual, comparison.model,
                                                     comparison.slack, comparison.own_included)
                confirmed &= agree
                judged.append((comparison, allowed))
            for comparison, allowed in judged:
                _count_weak(result, comparison, allowed, confirmed)
            checked = int(confirmed.sum())
            if not confirmed.all():
                closely.append((at.at(~confirmed), actual.at(~confirmed)))
    if undecided.any():
        closely.append((example.at(undecided), None))
    for points, actual in closely:
        failure, count = _checked_closely(prepared, subject, points, actual, options, result, rejected)
        if failure is not None:
            return failure  # a batch that fails counts none of its points
        checked += count
    result.points += checked
    return None


def _count_weak(result: Result, comparison: _Comparison, allowed: np.ndarray, judged: np.ndarray) -> None:
    """Count, at the points ``judged``, the elements of a check and those of them whose
    allowance is at least their exact value: there a zero would pass too (weak)."""
    if comparison.check == "claim" or not judged.any():
        return
    reference = np.abs(comparison.reference[0][judged])
    with np.errstate(invalid="ignore"):
        weak = (reference > 0) & (np.broadcast_to(allowed, comparison.reference[0].shape)[judged] >= reference)
    tally = result.weak.setdefault(comparison.label, [0, 0])
    tally[0] += int(weak.sum())
    tally[1] += int(reference.size)


def _value_checks(prepared: Plan, subject, values: dict) -> list:
    """The values that the rules judge: every node's, as steps of the spec's own torch
    lowering; a user's function has only its output's, as a checked quantity."""
    if isinstance(subject, SpecSubject):
        return [acceptance.step(f"the value of {name}", pair, _stable(prepared, name)) for name, pair in values.items()]
    output = prepared.spec.output
    return [acceptance.quantity(f"the value of {output}", values[output])]


def _stable(prepared: Plan, label: str) -> bool:
    node = prepared.nodes.get(label)
    return isinstance(node, Apply) and REGISTRY[node.op].stable


def _derivative_checks(prepared: Plan, subject, reference: ReferenceSide, options: Options,
                       unit: ReferenceSide | None = None) -> list:
    """The derivatives that the rules judge: those the options check, of what the subject
    shows (a user's function shows its inputs' gradients alone), each with the values it is
    computed from and, from the exact pass, itself at unit directions (``ExactPoint.unit``)."""
    output = prepared.spec.output
    reverse = "rev" in options.modes
    shown = prepared.spec.inputs if isinstance(subject, FunctionSubject) else reference.gradients

    # The values the code under test holds: a user's function holds its output alone (its
    # backward may read what it returned), the spec's lowering every node.
    held = {output} if isinstance(subject, FunctionSubject) else reference.values

    def checked(label: str, pair: tuple, labels, at_unit) -> tuple:
        reads = {name: reference.values[name] for name in labels if name in reference.values and name in held}
        if unit is not None:
            reads[f"{label} at unit directions"] = at_unit
        return acceptance.quantity(label, pair, reads)

    backward = prepared.backward_reads
    return [
        *(checked(f"∂{output}/∂{n}", pair, backward[n], unit and unit.gradients[n])
          for n, pair in reference.gradients.items() if reverse and n in shown),
        *(acceptance.quantity(f"the claimed {c.kind} of {c.wrt}", claimed)
          for c, (claimed, _) in zip(prepared.claims, reference.claimed)),
        *((checked("the JVP of " + output, reference.jvp, prepared.forward_reads()[output], unit and unit.jvp),)
          if reference.jvp is not None else ()),
        # A Hessian-vector product differentiates the backward, which reads any value.
        *(checked(f"the Hessian-vector product of {n}", pair, reference.values, unit and unit.hvps[n])
          for n, pair in reference.hvps.items()),
    ]


def _any_nan(values: dict, batch: int) -> np.ndarray:
    """Per point, whether some value is NaN."""
    found = np.zeros(batch, dtype=bool)
    for value, _ in values.values():
        found |= np.isnan(value.reshape(batch, -1)).any(axis=1)
    return found


def _finite(array) -> np.ndarray:
    """Per point, whether every element of ``array`` is finite."""
    array = np.asarray(array, dtype=np.float64)
    return np.isfinite(array.reshape(len(array), -1)).all(axis=1)


def _live(skipped: dict, label: str, points: np.ndarray) -> np.ndarray:
    """Per point of ``points`` (a mask over the batch), whether the check ``label`` is judged
    there: not where its exact value is no number the dtype holds."""
    mask = skipped.get(label)
    return np.ones(int(points.sum()), dtype=bool) if mask is None else ~mask[points]


def _float64_bounds(prepared: Plan, subject, example: Example, options: Options, forward: bool) -> dict:
    """Check label -> float64's own error bound, in its u: where a step overflows the dtype
    under test, the allowance's bound is lost, yet float64's tells whether the checked quantity
    is beyond that dtype's range, without the exact pass."""
    ctx, values = reference_values(prepared, example, precision(torch.float64))
    reference = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order, forward))
    checks = [*_value_checks(prepared, subject, values), *_derivative_checks(prepared, subject, reference, options)]
    return {label: pair[1] for label, pair, _, _ in checks}


def _checked_closely(prepared: Plan, subject, example: Example, actual: TorchSide | None, options: Options,
                     result: Result, rejected: Counter) -> tuple:
    """The checks of ``evaluate`` with the reference's error bounds, where the floor did not
    settle them: (the first Failure or None, the number of points checked). Without
    ``actual``, torch runs on the points the bounds accept. Points the bounds cannot settle
    go to the exact pass."""
    forward = "fwd" in options.modes and "fwd" not in result.unsupported
    ctx, values = reference_values(prepared, example, options.model)
    inside, exactly = acceptance.inside_domains(prepared, example, values, rejected, model=options.model)
    sure = {}  # point -> a function giving the Failure float64's bounds are sure of there
    skipped = {}  # a check -> the points where it is not judged (its quantity overflows, say)
    # A comparison within rounding of its boundary is decided exactly: an exact tie is checked.
    exactly |= inside & ctx.ambiguous
    float64_bounds = functools.cache(functools.partial(_float64_bounds, prepared, subject, example, options, forward))
    keep, unsure = acceptance.accepted_points(example.batch, options.model, rejected, inside & ~ctx.ambiguous,
                                              _value_checks(prepared, subject, values), skipped=skipped,
                                              float64_bounds=float64_bounds, left_range=ctx.left_range)
    exactly |= unsure
    checked = 0
    if keep.any():
        reference = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order,
                                                                 forward))
        exactly |= keep & ctx.ambiguous
        keep, unsure = acceptance.accepted_points(example.batch, options.model, rejected, keep & ~ctx.ambiguous,
                                                  _derivative_checks(prepared, subject, reference, options),
                                                  skipped=skipped, float64_bounds=float64_bounds,
                                                  left_range=ctx.left_range)
        exactly |= unsure
    if keep.any():
        at = example.at(keep)
        torch_side = _torch_side(prepared, subject, at, options, result) if actual is None else actual.at(keep)
        if not isinstance(torch_side, TorchSide):
            return torch_side, 0
        orders = acceptance.tied_orders(prepared, example, values, isinstance(subject, SpecSubject), rejected, keep)
        unsettled = np.zeros(at.batch, dtype=bool)
        judged = []
        for comparison in _comparisons(prepared, subject, restricted(reference, keep), torch_side, options.model,
                                       options.slack):
            if isinstance(comparison, Failure):
                return comparison, 0
            failing, close, allowed = acceptance.disagreeing(*comparison.reference, comparison.actual,
                                                             comparison.model, comparison.own_included,
                                                             comparison.slack)
            live = _live(skipped, comparison.label, keep)
            tied = ~_live(orders, comparison.label, keep)
            failing, close = failing & live & ~tied, close & live & ~tied
            # Not finite where a tie leaves the derivative several values: the exact pass judges it.
            close |= live & tied & ~_finite(comparison.actual)
            for index in np.flatnonzero(failing & ~unsettled):
                sure[int(np.flatnonzero(keep)[index])] = functools.partial(
                    _failure, prepared, subject, comparison, at, index, allowed[index], options)
            unsettled |= failing | close
            judged.append((comparison, allowed, live & ~tied))
        for comparison, allowed, live in judged:
            _count_weak(result, comparison, allowed, live & ~unsettled)
        checked = int((~unsettled).sum())
        exactly[np.flatnonzero(keep)[unsettled]] = True
    if sure and options.provisional:
        return sure[min(sure)](), 0
    if exactly.any():
        # A disagreement is decided exactly, first: the float64 reference may be what is off.
        position = np.cumsum(exactly) - 1
        failure, count = _checked_exactly(prepared, subject, example.at(exactly),
                                          {int(position[p]): failing for p, failing in sure.items()},
                                          None if actual is None else actual.at(exactly), options, result, rejected)
        if failure is not None:
            return failure, 0
        checked += count
    return None, checked


UNJUDGED = "left unjudged (the exact pass's budget per example)"
BEYOND = "left unjudged: beyond arb's exponent range (exp of 2**60 or more)"
INCONCLUSIVE = ("inconclusive: float64's bounds are sure of a disagreement that the exact pass could not decide "
                f"at {balls.PRECISIONS[-1]} bits")


def _checked_exactly(prepared: Plan, subject, example: Example, sure: dict, actual: TorchSide | None,
                     options: Options, result: Result, rejected: Counter) -> tuple:
    """The checks of ``evaluate`` against the exact reference, point by point, for the points
    float64 could not settle: (the first Failure or None, the number of points checked).

    ``sure`` maps each point where float64's bounds are sure that torch disagrees to the
    Failure they report. Such points are judged exactly, first (the float64 reference may be
    what is off), and so are the points where torch is not finite, whatever the budget:
    there a finite exact value the dtype holds is a failure, before any rule could reject the
    point. Where a result of a sure point is beyond arb's range, float64's verdict stands;
    where the exact pass cannot decide one, the run is inconclusive (``INCONCLUSIVE``). Of the
    other points, at most ``EXACT_POINTS`` (fewer where points are large, within
    ``EXACT_ELEMENTS`` input elements) are judged, and the rest counted as left.

    In a user's function, at a point exactly on a kink, a derivative may take either side's
    value (unless ``options.kinks`` is "torch"): the tutorial's ReLU has 1 at 0."""
    forward = "fwd" in options.modes and "fwd" not in result.unsupported
    one_sided = isinstance(subject, FunctionSubject) and options.kinks == "any"
    disagreed = np.isin(np.arange(example.batch), list(sure))
    if actual is None:
        actual = _torch_side(prepared, subject, example, options, result)
        if not isinstance(actual, TorchSide) or not actual.complete():
            actual = None  # a call raised, maybe where a point is rejected: torch runs point by point
    must = disagreed | (False if actual is None else ~actual.finite())
    elements = sum(array[0].size for array in example.inputs.values())
    others = max(1, min(EXACT_POINTS, EXACT_ELEMENTS // max(elements, 1)))
    rest = np.flatnonzero(~must)
    order = [*np.flatnonzero(disagreed), *np.flatnonzero(must & ~disagreed), *rest[:others]]
    if len(rest) > others:
        result.exact[UNJUDGED] += len(rest) - others
    checked = 0
    for index in order:
        only = np.arange(example.batch) == index
        point = example.at(only)
        try:
            if _rejected_by_its_values(prepared, subject, point, options, rejected):
                continue
            exact = exact_point(prepared, point, options.model, options.order, forward, one_sided)
        except balls.Beyond:
            if disagreed[index]:
                failure = sure[index]()
                failure.notes.append("beyond arb's exponent range (exp of 2**60 or more): float64's bounds decide")
                return failure, 0
            result.exact[BEYOND] += 1
            continue
        if exact is None:
            if disagreed[index]:
                result.exact[INCONCLUSIVE] += 1
            else:
                rejected[f"the exact pass could not decide a comparison at {balls.PRECISIONS[-1]} bits"] += 1
            continue
        reference = exact.side
        inside, _ = acceptance.inside_domains(prepared, point, reference.values, rejected, how="exact",
                                              gaps=exact.gaps)
        skipped = {}
        keep, _ = acceptance.accepted_points(1, options.model, rejected, inside,
                                             _value_checks(prepared, subject, reference.values), how="exact",
                                             skipped=skipped)
        keep, _ = acceptance.accepted_points(1, options.model, rejected, keep,
                                             _derivative_checks(prepared, subject, reference, options, exact.unit),
                                             how="exact", skipped=skipped)
        if not keep.any():
            continue
        if isinstance(subject, SpecSubject):
            _skip_overflowing_chains(prepared, reference, exact.overflowed, skipped, rejected, options)
        torch_side = _torch_side(prepared, subject, point, options, result) if actual is None else actual.at(only)
        if not isinstance(torch_side, TorchSide):
            return torch_side, 0
        sides = [list(_comparisons(prepared, subject, side, torch_side, options.model, options.slack))
                 for side in [reference, *exact.one_sided]]
        failure = _not_finite(prepared, subject, sides[0], skipped, point, options, exact.bits)
        if failure is not None:
            return failure, 0
        ties = acceptance.tied_orders(prepared, point, reference.values, isinstance(subject, SpecSubject), rejected,
                                      keep)
        skipped = {label: skipped.get(label, False) | ties.get(label, False) for label in {*skipped, *ties}}
        if exact.ambiguous:
            rejected[acceptance.AMBIGUOUS] += 1
            continue
        judged, unbounded = [], []
        for comparison, *other_sides in zip(*sides):
            if not _live(skipped, comparison.label, keep)[0]:
                continue
            # An HVP differentiates the backward: where a value or gradient has no bound, nor has it.
            if acceptance.unbounded(comparison.reference) or unbounded and comparison.check == "HVP":
                unbounded.append(comparison.subject)
                continue
            failing, _, allowed = acceptance.disagreeing(*comparison.reference, comparison.actual, comparison.model,
                                                         exact=True, slack=comparison.slack)
            judged.append((comparison, allowed))
            if not failing.any() or comparison.check in DERIVATIVES and any(map(_agrees_exactly, other_sides)):
                continue
            failure = _failure(prepared, subject, comparison, point, 0, allowed[0], options)
            failure.notes.append(f"decided by the exact pass (arb balls at {exact.bits} bits)")
            if exact.one_sided:
                failure.notes.append("the point is exactly on a kink: no one-sided derivative agrees either")
            return failure, 0
        if unbounded:  # one reason per point, naming every check it leaves without a bound
            rejected[acceptance.UNBOUNDED.format(", ".join(unbounded))] += 1
        if not judged:
            continue
        for comparison, allowed in judged:
            _count_weak(result, comparison, allowed, np.ones(1, dtype=bool))
        checked += 1
        result.exact["judged by the exact pass"] += 1
        if disagreed[index]:
            result.exact["float64 disagreed, and the exact reference agrees"] += 1
    return None, checked


def _skip_overflowing_chains(prepared: Plan, reference: ReferenceSide, overflowed: frozenset, skipped: dict,
                             rejected: Counter, options: Options) -> None:
    """In the spec's own lowering, torch runs the backward's and forward mode's steps too: where
    one of them overflows the dtype (an adjoint, a tangent), the derivatives along that chain
    are not judged at the point (rule 2 for those steps), counted."""
    output = prepared.spec.output
    chains = {"backward": [f"∂{output}/∂{name}" for name in reference.gradients],
              "forward": [f"the JVP of {output}"] if reference.jvp is not None else []}
    second = [f"the Hessian-vector product of {name}" for name in reference.hvps]
    for kind in overflowed & {"backward", "forward"}:
        for label in chains[kind] + second:
            if label not in skipped:
                skipped[label] = np.ones(1, dtype=bool)
                rejected[f"{label}: a step of torch's {kind} overflows {options.dtype_name}"] += 1


def _not_finite(prepared: Plan, subject, comparisons: list, skipped: dict, point: Example, options: Options,
                bits: int) -> Failure | None:
    """The first check where torch is not finite while the exact value is finite and the dtype
    holds it: a failure whatever else would reject the point (a rounding that reaches a
    singularity of the spec's steps, a tie within rounding)."""
    for comparison in comparisons:
        if isinstance(comparison, Failure):
            return comparison
        if comparison.check == "claim" or not _live(skipped, comparison.label, np.ones(1, dtype=bool))[0]:
            continue
        exact = np.asarray(comparison.reference[0], dtype=np.float64)
        actual = np.asarray(comparison.actual, dtype=np.float64)
        wrong = ~np.isfinite(actual) & np.isfinite(exact)
        if wrong.any():
            _, _, allowed = acceptance.disagreeing(*comparison.reference, actual, comparison.model, exact=True,
                                                   slack=comparison.slack)
            failure = _failure(prepared, subject, comparison, point, 0, allowed[0], options)
            failure.notes.append(f"torch is not finite where the exact value is finite and {options.dtype_name} "
                                 f"holds it (decided by the exact pass, arb balls at {bits} bits)")
            return failure
    return None


def _rejected_by_its_values(prepared: Plan, subject, point: Example, options: Options, rejected: Counter) -> bool:
    """Whether the exact values at ``point`` reject it by the rules on values (domains, and
    what the dtype holds of the spec's steps), counted in ``rejected`` where they do: the
    exact pass of every derivative would reject it the same way, at many times the cost
    (attention's points whose softmax underflows)."""
    found = exact_values(prepared, point, options.model)
    if found is None:
        return False
    values, gaps = found
    reasons = Counter()
    inside, _ = acceptance.inside_domains(prepared, point, values, reasons, how="exact", gaps=gaps)
    keep, _ = acceptance.accepted_points(1, options.model, reasons, inside, _value_checks(prepared, subject, values),
                                         how="exact", skipped={})
    if keep.any():
        return False
    rejected.update(reasons)
    return True


# Checks where a user's function may take either side's derivative at an exact kink.
DERIVATIVES = ("gradient", "JVP", "HVP")
KINKS = ("any", "torch")


def _agrees_exactly(comparison) -> bool:
    failing, _, _ = acceptance.disagreeing(*comparison.reference, comparison.actual, comparison.model, exact=True,
                                           slack=comparison.slack)
    return not failing.any()


def _point_inputs(spec: Spec, at: Example, point: int) -> dict:
    """The inputs at one point, as shown: integers (labels, indices) as integers."""
    return {name: array[point].astype(np.int64) if spec.inputs[name].integer else array[point]
            for name, array in at.inputs.items()}


def _failure(prepared: Plan, subject, comparison: _Comparison, at: Example, point: int, allowed,
             options: Options) -> Failure:
    spec = prepared.spec
    inputs = _point_inputs(spec, at, point)
    if spec.nodes[spec.output].shape or at.cotangent[point] != 1:
        inputs["cotangent"] = at.cotangent[point]  # the gradient seeded into backward
    if comparison.tangents:
        inputs.update({f"tangent of {name}": t[point] for name, t in at.tangents.items()})
    snippet = "" if comparison.check == "claim" else _snippet(subject, comparison.check, at, point, options)
    failure = Failure(comparison.check, comparison.subject, _formula(prepared, *comparison.formula), inputs,
                      at.sizes, comparison.reference[0][point], comparison.actual[point], allowed, line=comparison.line,
                      snippet=snippet, point=_only(at, point), **comparison.details)
    return _noting_layout(failure, subject, at)


def _noting_layout(failure: Failure, subject, at: Example) -> Failure:
    """A failure under a drawn memory layout says which, and how to make it; one where stacked
    rows gave other results than alone says that too."""
    if isinstance(subject, FunctionSubject) and at.layout != "contiguous":
        failure.notes.append(f"layout: the inputs and their directions were handed to {subject.name} {at.layout}: "
                             f"{layouts.MADE[at.layout].format(t='t')}; the values are the drawn ones, so if "
                             f"layouts=\"contiguous\" passes, {subject.name} assumes a layout")
    if isinstance(subject, FunctionSubject):
        failure.notes.extend(subject.stacked_apart.values())
    return failure


def _only(at: Example, point: int) -> Example:
    return at.at(np.arange(at.batch) == point)


def _code_failure(failed: CodeFailure, subject, at: Example, options: Options) -> Failure:
    inputs = _point_inputs(subject.spec, at, failed.point)
    failure = Failure(failed.check, subject.name, "", inputs, at.sizes, None, None, None, error=failed.message,
                      snippet=_snippet(subject, failed.check, at, failed.point, options), point=_only(at, failed.point))
    return _noting_layout(failure, subject, at)


def _snippet(subject, check: str, at: Example, point: int, options: Options) -> str:
    if not isinstance(subject, FunctionSubject) or getattr(subject.fn, "reproduce_arguments", None):
        return ""  # a module or a tuple is called through verify's binding, not as the user calls it
    spec = subject.spec
    fixed = {name: "int64" if declared.integer else options.dtype_name
             for name, declared in spec.inputs.items() if declared.data}
    pick = slice(point, point + 1) if subject.rows else point  # a row-wise function takes a stack of one
    return reproduction_snippet(subject.name, check, {n: a[pick] for n, a in at.inputs.items()},
                                at.cotangent[pick], {n: t[pick] for n, t in (at.tangents or {}).items()},
                                options.dtype_name, fixed, at.layout)


def _backward_order(spec: Spec, names) -> list:
    """Output first, then intermediates from the last to the first, then inputs."""
    order = [*reversed(spec.nodes), *spec.inputs]
    return [n for n in order if n in names]


def _consumers(spec: Spec, name: str) -> list:
    """Named nodes whose definitions use ``name`` directly."""
    target = spec.variable(name)

    def uses(node) -> bool:
        if node is target:
            return True
        if isinstance(node, Ref):
            return node.target is target
        return any(uses(a) for a in node.args)

    return [n for n, node in spec.nodes.items() if n != name and uses(node)]


def _blame(spec: Spec, name: str) -> str:
    consumers = _consumers(spec, name)
    if not consumers:
        return ""
    shown = ", ".join(f"{c} (line {spec.locs[c].line}: {spec.locs[c].text})" for c in consumers)
    return (f"∂{spec.output}/∂{name} is the first gradient that disagrees, while its consumers agree: "
            f"the backward of {shown} into {name} is to blame")


def _line(spec: Spec, name: str) -> int | None:
    loc = spec.locs.get(name)
    return loc.line if loc else None


def _formula(prepared: Plan, label: str, tensor: Tensor) -> str:
    index = f"[{', '.join(str(i) for i in tensor.indices)}]" if tensor.indices else ""
    shown = shown_formula(prepared, tensor)
    explained = f"   ({COTANGENT_NAME}: the cotangent handed to backward)" if _names_cotangent(shown) else ""
    return f"{label}{index} = {shown}{explained}"


def shown_formula(prepared: Plan, tensor: Tensor) -> str:
    """A formula as a reader sees it: in the inputs where that is short (each step and adjoint
    inlined), else as the chain rule has it, one op at a time."""
    spec = prepared.spec
    names = {*spec.size_symbols, *spec.inputs, *spec.nodes}
    shown = readable(tensor.expr, spec.output, tensor.indices, names)
    inlined = _in_the_inputs(prepared, tensor)
    if inlined is not None:
        closed = readable(inlined.expr, spec.output, tensor.indices, names)
        shown = closed if len(closed) <= CLOSED_FORM_CHARACTERS else shown
    return shown


def _names_cotangent(text: str) -> bool:
    return re.search(rf"(?<![\w.]){COTANGENT_NAME}(?![\w(])", text) is not None


def _in_the_inputs(prepared: Plan, tensor: Tensor) -> Tensor | None:
    """``tensor`` with every step and adjoint inlined, until only inputs and the cotangent are
    left; None where that grows past what a reader would take in."""
    output = prepared.spec.output
    definitions = {label: reference.tensor for label, reference in prepared.values.items()
                   if label not in prepared.spec.inputs}
    definitions.update({adjoint_name(label): reference.tensor for label, reference in prepared.adjoints.items()
                        if label != output})
    if any(base.name.startswith(TANGENT_PREFIX) for base in tensor.expr.atoms(sympy.IndexedBase, sympy.Symbol)
           if hasattr(base, "name")):
        definitions.update({tangent_name(label): reference.tensor for label, reference in
                            prepared.forward_mode().items() if label not in prepared.spec.inputs})
    for _ in range(len(definitions) + 1):
        inlined = tensor.inline(definitions)
        if inlined.expr == tensor.expr:
            return tensor
        if len(str(inlined.expr)) > 4 * CLOSED_FORM_CHARACTERS:
            return None
        tensor = inlined
    return None


# A formula in the inputs is shown where it is at most this long; else the chain rule's.
CLOSED_FORM_CHARACTERS = 100
# Candidate bounds on an input's magnitude tried at once when a failure's steps overflow.
BOUND_CANDIDATES = 64
# The steps named per kind (overflowing, underflowing) in a failure's notes.
STEPS_NAMED = 3


def failure_notes(prepared: Plan, failure: Failure, model: Precision, spec_lowering: bool) -> list:
    """What explains a failure at its point: the steps at the dtype's range edge
    (``range_edge_notes``), and a recorded finding of torch's op (``verify.findings``) that
    matches it: in the spec's own lowering, torch's; in a function, if it calls that op."""
    point = failure.point
    _, values = reference_values(prepared, point, model, bounded=False)
    notes = range_edge_notes(prepared, point, model, values)
    at_point = {label: np.asarray(value)[0] for label, (value, _) in values.items()}
    inputs = {name: array[0] for name, array in point.inputs.items()}
    for found in findings.matching(prepared.nodes, at_point, inputs, model.dtype, failure.check):
        recorded = f"a recorded finding in torch's own {found.op}: {found.what} ({findings.FINDINGS_DOC})"
        notes.append(f"this matches {recorded}; torch is off here, not the spec" if spec_lowering else
                     f"if the function calls torch's {found.op} here, this matches {recorded}")
    return notes


def range_edge_notes(prepared: Plan, point: Example, model: Precision, values: dict) -> list:
    """Why a failure at ``point`` (one point) may sit at the edge of the dtype's range: the
    spec's steps whose value there (``values``, label -> pair) is beyond the dtype's largest
    number (code that computes the step overflows, though the checked result is finite) or
    nonzero below half its smallest (it gets 0), and for an overflow the interval of one input
    that keeps every step inside."""
    dtype = model.dtype
    half_smallest = smallest_subnormal(dtype) / 2
    over, under = [], []
    for label, (value, _) in values.items():
        magnitude = np.abs(np.asarray(value, dtype=np.float64))
        if overflows(np.nan_to_num(magnitude, nan=0.0, posinf=np.inf), 0.0, dtype).any():
            largest = np.nanmax(magnitude)
            size = f"is beyond {model.name}'s range here" if np.isinf(largest) else \
                f"is {largest:.6g} here, which rounds to inf in {model.name}"
            over.append(f"{label} {size}: code that computes this step overflows")
        tiny = magnitude[(magnitude > 0) & (magnitude < half_smallest)]
        if tiny.size:
            under.append(f"{label} is {tiny.min():.3g} here, below {model.name}'s smallest number: code that "
                         "computes this step gets 0 (and inf or NaN from what divides by it)")
    notes = over[:STEPS_NAMED] + under[:STEPS_NAMED]
    if over:
        suggestion = _bounded_input(prepared, point, model)
        if suggestion:
            notes.append(suggestion)
    return notes


def _bounded_input(prepared: Plan, point: Example, model: Precision) -> str:
    """A declaration of one input's interval under which no step of ``point``'s spec overflows
    there, found by clipping that input at many bounds at once, twice (the second time between
    the first's neighbours); "" where none is."""
    for name, declared in prepared.spec.inputs.items():
        if declared.integer or declared.data:
            continue
        top = float(np.max(np.abs(point.inputs[name]), initial=0.0))
        if not np.isfinite(top) or top <= 1.0:
            continue
        bounds = np.geomspace(top, 1.0, BOUND_CANDIDATES)
        fits = _fitting(prepared, point, model, name, bounds)
        if not fits.any():
            continue
        first = int(np.argmax(fits))
        if first > 0:
            finer = np.geomspace(bounds[first - 1], bounds[first], BOUND_CANDIDATES)
            bounds, fits = finer, _fitting(prepared, point, model, name, finer)
        bound = float(bounds[np.argmax(fits)])
        shown = float(f"{bound:.2g}")
        if shown > bound:  # rounded up past the bound: one digit down
            shown = float(f"{shown - 10 ** math.floor(math.log10(shown) - 1):.2g}")
        return (f"if inputs this large cannot occur, declare `{name}: Interval({-shown:.2g}, {shown:.2g})"
                f"{_shape_text(declared)}`: there no step overflows {model.name}")
    return ""


def _fitting(prepared: Plan, point: Example, model: Precision, name: str, bounds: np.ndarray) -> np.ndarray:
    """Per bound, whether every step of the spec stays inside the dtype's range at ``point``
    with input ``name`` clipped to that magnitude."""
    count = len(bounds)
    repeated = {n: np.repeat(a, count, axis=0) for n, a in point.inputs.items()}
    limit = bounds.reshape((-1,) + (1,) * (repeated[name].ndim - 1))
    repeated[name] = np.clip(repeated[name], -limit, limit)
    tangents = None if point.tangents is None else {n: np.repeat(t, count, axis=0) for n, t in point.tangents.items()}
    candidates = Example(point.sizes, repeated, np.repeat(point.cotangent, count, axis=0), tangents)
    fits = np.ones(count, dtype=bool)
    with np.errstate(all="ignore"):
        _, values = reference_values(prepared, candidates, model, bounded=False)
        for value, _ in values.values():
            magnitude = np.abs(np.asarray(value, dtype=np.float64)).reshape(count, -1)
            fits &= ~overflows(magnitude, 0.0, model.dtype).any(axis=1)
    return fits


def _shape_text(declared) -> str:
    return f"[{', '.join(str(d) for d in declared.shape)}]" if declared.shape else ""
