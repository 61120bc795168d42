"""The checks of one batch: the reference and torch on the same points, compared.

``evaluate`` runs a batch in two passes. The reference is first evaluated without its error
bounds, and points where torch agrees within the tolerance of the bounds' floor are checked at
that. The other points get the bounds, and with them are passed, failed, or rejected (too
close to a kink, or a step that overflows).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ir import Apply, Constant, Ref, SizeRef, Spec, concrete_shape
from .lower.sympy import COTANGENT, Tensor, tangent_name
from .ops import REGISTRY
from .reference import ERROR_DTYPE, Context, Reference, per_point
from .report import Failure, Result, reproduction_snippet
from .settings import MODES
from .strategies import Example
from .subject import CodeFailure, FunctionSubject, ModeUnsupported, SpecSubject
from .tolerance import UNIT_ROUNDOFF, allowed_error, representable_limit, underflow_limit

if TYPE_CHECKING:
    from .engine import Plan

@dataclass(frozen=True)
class Options:
    """What one run checks, and where."""

    dtype: torch.dtype = torch.float64
    order: int = 1
    modes: tuple = MODES
    device: str = "cpu"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class ReferenceSide:
    """The reference on a batch; each entry is a (value, error bound) pair, or with
    ``bounded=False`` a (value, floor of the error bound) pair."""

    values: dict  # label -> pair
    gradients: dict  # name -> the VJP with the example's cotangent
    claimed: list  # per claim: (claimed form, sympy's derivative)
    jvp: tuple | None
    hvps: dict


def reference_side(prepared: Plan, example: Example, dtype: torch.dtype, order: int = 1,
                   forward: bool = False) -> ReferenceSide:
    """The reference at every point of ``example``: values, VJPs, claims, and (as asked) the
    JVP and Hessian-vector products."""
    ctx, values, _, _ = reference_values(prepared, example, dtype)
    return ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, order, forward))


def reference_values(prepared: Plan, example: Example, dtype: torch.dtype, bounded: bool = True) -> tuple:
    """(context, node label -> (value, error bound), points inside every domain, the domains
    the others are outside of) at every point of ``example``. Without ``bounded``, the error
    bounds are only floors, and cost no error arithmetic."""
    # Inputs carry one rounding each in the error bounds, though they are exact: an algorithm
    # is right when its result is the exact one for inputs perturbed by a rounding (backward
    # stability), so the bounds include the condition number of each formula at the point.
    ctx = Context({name: (array, np.abs(array).astype(ERROR_DTYPE)) for name, array in example.inputs.items()},
                  example.sizes, example.batch, dtype)
    exact = np.zeros((), dtype=ERROR_DTYPE)
    if prepared.spec.nodes[prepared.spec.output].shape:
        ctx.env[COTANGENT] = (example.cotangent, np.broadcast_to(exact, example.cotangent.shape))
    for name, tangent in (example.tangents or {}).items():
        ctx.env[tangent_name(name)] = (tangent, np.broadcast_to(exact, tangent.shape))
    values = {}
    for name, reference in prepared.values.items():
        value, error = reference(ctx) if bounded else reference.estimate(ctx)
        if bounded and name in prepared.steps:  # in graph order, so the operands' entries are ready
            error = np.maximum(error, prepared.steps[name](ctx)[1])
        values[name] = ctx.env[name] = value, error  # gradient formulas refer to node values
    outside = Counter()
    inside = _inside_domains(prepared, example, values, outside)
    if bounded:
        forward_amplification = _amplification(prepared, example, values, dtype, "forward_condition")
        values = {name: _amplified(pair, forward_amplification) for name, pair in values.items()}
    return ctx, values, inside, outside


def reference_derivatives(prepared: Plan, example: Example, ctx: Context, values: dict, order: int,
                          forward: bool, bounded: bool = True) -> tuple:
    """(VJPs, claims, JVP, Hessian-vector products) in the context of ``reference_values``."""
    amplification = _amplification(prepared, example, values, ctx.dtype, "backward_condition") if bounded else None

    def evaluated(reference: Reference) -> tuple:
        return reference(ctx) if bounded else reference.estimate(ctx)

    def widened(pair: tuple) -> tuple:
        return pair if amplification is None else _amplified(pair, amplification, of_terms=True)

    derivatives = {name: evaluated(reference) for name, reference in prepared.gradients.items()}
    # A scalar output's formulas hold no cotangent: its VJP is the gradient times the cotangent.
    seed = None if prepared.spec.nodes[prepared.spec.output].shape else example.cotangent
    gradients = {name: widened(_times(pair, seed)) for name, pair in derivatives.items()}
    claimed = [(evaluated(claim.reference), derivatives[claim.wrt] if claim.kind == "grad" else evaluated(claim.derivative))
               for claim in prepared.claims]
    jvp = widened(evaluated(prepared.forward_mode())) if forward else None
    hvps = ({name: widened(_times(evaluated(reference), seed)) for name, reference in prepared.second_order().items()}
            if order == 2 else {})
    return gradients, claimed, jvp, hvps


def _times(pair: tuple, seed) -> tuple:
    """(value, error) times a per-point scalar, with one more rounding."""
    if seed is None:
        return pair
    value, error = pair
    factor = seed.reshape((len(seed),) + (1,) * (value.ndim - 1))
    with np.errstate(all="ignore"):  # inf bounds stay inf; the point is rejected later
        product = value * factor
        return product, error * np.abs(factor) + np.abs(product)


def _amplification(prepared: Plan, example: Example, values: dict, dtype: torch.dtype, which: str) -> np.ndarray:
    """Per point, the largest amplification of rounding by the way torch computes an op,
    capped at 1/u of float64: ``which`` is the registry's ``backward_condition`` (it widens
    the bounds of VJPs, JVPs and HVPs) or ``forward_condition`` (values)."""
    cap = 1 / UNIT_ROUNDOFF[torch.float64]
    worst = np.zeros(example.batch, dtype=ERROR_DTYPE)
    array_of = _node_arrays(prepared, example, values)
    for label, node in prepared.nodes.items():
        condition = getattr(REGISTRY[node.op], which) if isinstance(node, Apply) else None
        if condition is None or label not in values:
            continue
        with np.errstate(all="ignore"):
            operands = (array_of(o, node.rank if REGISTRY[node.op].kind == "elementwise" else o.rank)
                        for o in node.operands)
            amplification = np.asarray(condition(dtype, values[label][0], *operands), dtype=ERROR_DTYPE)
        amplification = np.nan_to_num(amplification.reshape(example.batch, -1), nan=0.0, posinf=cap)
        worst = np.maximum(worst, np.minimum(amplification.max(axis=1), cap))
    return worst


def _node_arrays(prepared: Plan, example: Example, values: dict):
    """A function giving a node's reference values, with size-1 dims after the batch dim up to ``rank``."""
    labels = {id(node): label for label, node in prepared.nodes.items()}

    def array_of(operand, rank):
        while isinstance(operand, Ref):
            operand = operand.target
        if isinstance(operand, Constant):
            return float(operand.value)
        if isinstance(operand, SizeRef):
            return float(example.sizes[operand.symbol.name])
        label = labels[id(operand)]
        array = example.inputs[label] if label in example.inputs else values[label][0]
        return array.reshape(array.shape[:1] + (1,) * (rank - operand.rank) + array.shape[1:])

    return array_of


def _amplified(pair: tuple, amplification: np.ndarray, of_terms: bool = False) -> tuple:
    """The error bound widened by the amplification, norm-wise: rounding in a solve spreads
    over every element of the result. ``of_terms`` scales it by the magnitude of the terms
    (a derivative's bound has its a priori floor) rather than of the result, which may cancel:
    sigmoid's JVP terms at -28 and 59 nearly cancel, and the one at 59 is lost to 1 - y."""
    value, error = pair
    with np.errstate(all="ignore"):
        scale = np.maximum(np.abs(value), error) if of_terms else np.abs(value)
        largest = scale.reshape(len(value), -1).max(axis=1) if value.ndim > 1 else scale
        return value, error + per_point(amplification * largest, value)


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
                       if isinstance(subject, SpecSubject) or name in spec.inputs}
    try:
        values, gradients, _ = subject.reverse(at, value_shapes, gradient_shapes, dtype)
    except ModeUnsupported as unsupported:
        result.unsupported["dtype"] = str(unsupported)
        return None
    except CodeFailure as failed:
        return _code_failure(failed, subject, at, options)
    side = TorchSide(values, gradients if "rev" in options.modes else {})
    if "fwd" in options.modes and "fwd" not in result.unsupported:
        try:
            side.jvp = subject.forward(at, dtype)
        except ModeUnsupported as unsupported:
            result.unsupported["fwd"] = str(unsupported)
        except CodeFailure as failed:
            side.jvp = _code_failure(failed, subject, at, options)
    if options.order == 2:
        ways = [("rev-over-rev", False)] if "rev" in options.modes else []
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
    reference: tuple
    actual: np.ndarray
    formula: tuple  # (its label, its Tensor): printed only for a failure, as sympy prints slowly
    line: int | None
    dtype: torch.dtype
    tangents: bool = False  # the failing point is shown with its tangents
    details: dict = field(default_factory=dict)


def _comparisons(prepared: Plan, subject, reference: ReferenceSide, actual: TorchSide, dtype: torch.dtype):
    """Every check of a batch, in the order a failure is reported; a raised call's Failure where
    its check would be."""
    spec = prepared.spec
    output = spec.output
    for name, array in actual.values.items():
        yield _Comparison("value", f"the value of {name}", reference.values[name], array,
                          (name, prepared.values[name].tensor), _line(spec, name), dtype)
    for name in _backward_order(spec, actual.gradients):
        blame = _blame(spec, name) if isinstance(subject, SpecSubject) else ""
        yield _Comparison("gradient", f"∂{output}/∂{name}", reference.gradients[name], actual.gradients[name],
                          (f"∂{output}/∂{name}", prepared.gradients[name].tensor), _line(spec, name), dtype,
                          details={"blame": blame})
    for claim, ((claimed, claimed_error), (derivative, error)) in zip(prepared.claims, reference.claimed):
        label = f"∂{output}/∂{claim.wrt}" if claim.kind == "grad" else f"∂²{output}/∂{claim.wrt}²"
        with np.errstate(over="ignore"):  # two float64 formulas: both carry rounding
            both_errors = claimed_error + error + np.abs(claimed)
        yield _Comparison("claim", f"{claim.kind}({output}, {claim.wrt})", (derivative, both_errors), claimed,
                          (label, claim.derivative.tensor), claim.line, torch.float64,
                          details={"reference_label": "derivative", "actual_label": "claimed", "claim": claim.text})
    if isinstance(actual.jvp, Failure):
        yield actual.jvp
    elif actual.jvp is not None:
        yield _Comparison("JVP", f"the JVP of {output}", reference.jvp, actual.jvp,
                          (f"JVP of {output}", prepared.forward_mode().tensor), _line(spec, output), dtype,
                          tangents=True)
    for way, products in actual.hvps.items():
        if isinstance(products, Failure):
            yield products
            continue
        for name, array in products.items():
            yield _Comparison("HVP", f"the Hessian-vector product of {name} ({way})", reference.hvps[name], array,
                              (f"HVP of {name}", prepared.second_order()[name].tensor), _line(spec, name), dtype,
                              tangents=True)


def evaluate(prepared: Plan, subject, example: Example, options: Options, result: Result, rejected: Counter):
    """Compare both sides on one batch of ``prepared``'s spec; returns the first Failure, or
    None when all agree.

    ``subject`` is a FunctionSubject, or None for the spec's own torch lowering.

    The reference is first evaluated without its error bounds. Points where torch agrees
    with it within the tolerance of a floor of those bounds (tighter than the bounds allow)
    are checked at that; only the others pay for the error arithmetic, and only there are
    points rejected as too close to a kink or with a step that overflows. Points with a NaN
    value, and a batch where a torch call raised, go to the bounds before torch sees them.
    """
    subject = subject or prepared.subject.on(options.device)
    dtype = options.dtype
    forward = "fwd" in options.modes and "fwd" not in result.unsupported
    for claim, status in zip(prepared.claims, result.claims):
        status.proved = status.proved and claim.proved
    result.examples += 1
    ctx, values, inside, outside = reference_values(prepared, example, dtype, bounded=False)
    rejected.update(outside)
    keep = _accepted_points(example.batch, dtype, rejected, inside,
                            [(f"the value of {n}", value) for n, value in values.items()], bounded=False)
    if not keep.any():
        return None
    # A NaN value is undefined math or a step that overflowed: only the bounds tell which, and
    # torch runs there only where they accept the point.
    undecided = keep & _any_nan(values, example.batch)
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
            for comparison in _comparisons(prepared, subject, _restricted(estimate, keep), actual, dtype):
                confirmed &= _agreeing(*comparison.reference, comparison.actual, comparison.dtype)
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


def _any_nan(values: dict, batch: int) -> np.ndarray:
    """Per point, whether some value is NaN."""
    found = np.zeros(batch, dtype=bool)
    for value, _ in values.values():
        found |= np.isnan(value.reshape(batch, -1)).any(axis=1)
    return found


def _checked_closely(prepared: Plan, subject, example: Example, actual: TorchSide | None, options: Options,
                     result: Result, rejected: Counter) -> tuple:
    """The checks of ``evaluate`` with the reference's error bounds, where the floor did not
    settle them: (the first Failure or None, the number of points checked). Without
    ``actual``, torch runs on the points the bounds accept."""
    dtype = options.dtype
    forward = "fwd" in options.modes and "fwd" not in result.unsupported
    ctx, values, inside, outside = reference_values(prepared, example, dtype)
    rejected.update(outside)
    keep = _unambiguous(inside, ctx.ambiguous, rejected)
    keep = _accepted_points(example.batch, dtype, rejected, keep,
                            [(f"the value of {n}", value) for n, value in values.items()])
    if not keep.any():  # the derivatives would be rejected too: a batch of overflows costs little
        return None, 0
    reference = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order, forward))
    output = prepared.spec.output
    keep = _accepted_points(example.batch, dtype, rejected, _unambiguous(keep, ctx.ambiguous, rejected), [
        *((f"∂{output}/∂{n}", value) for n, value in reference.gradients.items()),
        *((f"the claimed {c.kind} of {c.wrt}", value) for c, (value, _) in zip(prepared.claims, reference.claimed)),
        *((("the JVP of " + output, reference.jvp),) if reference.jvp is not None else ()),
        *((f"the Hessian-vector product of {n}", value) for n, value in reference.hvps.items()),
    ])
    if not keep.any():
        return None, 0
    at = example.at(keep)
    actual = _torch_side(prepared, subject, at, options, result) if actual is None else actual.at(keep)
    if not isinstance(actual, TorchSide):
        return actual, 0
    for comparison in _comparisons(prepared, subject, _restricted(reference, keep), actual, dtype):
        if isinstance(comparison, Failure):
            return comparison, 0
        found = _compare(*comparison.reference, comparison.actual, comparison.dtype)
        if found is not None:
            return _failure(prepared.spec, subject, comparison, at, *found, options), 0
    return None, int(keep.sum())


def _restricted(reference: ReferenceSide, keep: np.ndarray) -> ReferenceSide:
    """The reference's pairs at the points where ``keep`` is true."""
    if keep.all():
        return reference

    def kept(pair):
        return None if pair is None else (pair[0][keep], pair[1][keep])

    return ReferenceSide({n: kept(p) for n, p in reference.values.items()},
                         {n: kept(p) for n, p in reference.gradients.items()},
                         [(kept(claimed), kept(derivative)) for claimed, derivative in reference.claimed],
                         kept(reference.jvp), {n: kept(p) for n, p in reference.hvps.items()})


def _failure(spec: Spec, subject, comparison: _Comparison, at: Example, point: int, allowed, options: Options) -> Failure:
    inputs = {name: array[point] for name, array in at.inputs.items()}
    if spec.nodes[spec.output].shape or at.cotangent[point] != 1:
        inputs["cotangent"] = at.cotangent[point]  # the gradient seeded into backward
    if comparison.tangents:
        inputs.update({f"tangent of {name}": t[point] for name, t in at.tangents.items()})
    snippet = "" if comparison.check == "claim" else _snippet(subject, comparison.check, at, point, options)
    return Failure(comparison.check, comparison.subject, _formula(*comparison.formula), inputs, at.sizes,
                   comparison.reference[0][point], comparison.actual[point], allowed, line=comparison.line,
                   snippet=snippet, point=_only(at, point), **comparison.details)


def _only(at: Example, point: int) -> Example:
    return at.at(np.arange(at.batch) == point)


def _code_failure(failed: CodeFailure, subject, at: Example, options: Options) -> Failure:
    inputs = {name: array[failed.point] for name, array in at.inputs.items()}
    return Failure(failed.check, subject.name, "", inputs, at.sizes, None, None, None, error=failed.message,
                   snippet=_snippet(subject, failed.check, at, failed.point, options))


def _snippet(subject, check: str, at: Example, point: int, options: Options) -> str:
    if not isinstance(subject, FunctionSubject):
        return ""
    return reproduction_snippet(subject.name, check, {n: a[point] for n, a in at.inputs.items()},
                                at.cotangent[point], {n: t[point] for n, t in (at.tangents or {}).items()},
                                options.dtype_name)


def _inside_domains(prepared: Plan, example: Example, values: dict, rejected: Counter) -> np.ndarray:
    """Points where every op is inside its domain (the registry's ``defined``), by its
    operand values; the others are counted with the op's domain as the reason."""
    keep = np.ones(example.batch, dtype=bool)
    array_of = _node_arrays(prepared, example, values)
    for label, node in prepared.nodes.items():
        op = REGISTRY[node.op] if isinstance(node, Apply) else None
        if op is None or op.defined is None:
            continue
        rank = max(o.rank for o in node.operands) if op.kind == "elementwise" else 0
        with np.errstate(all="ignore"):
            inside = np.asarray(op.defined(*(array_of(o, rank) for o in node.operands)), dtype=bool)
        per_point = inside.reshape(inside.shape[0], -1).all(axis=1) if inside.ndim else inside
        outside = keep & ~np.broadcast_to(per_point, keep.shape)
        if outside.any():
            rejected[f"{label} is outside the domain of {node.op}: {op.domain}"] += int(outside.sum())
            keep &= ~outside
    return keep


def _unambiguous(keep: np.ndarray, ambiguous: np.ndarray, rejected: Counter) -> np.ndarray:
    """``keep`` less the points where a comparison was too close to call, counted."""
    newly = keep & ambiguous
    if newly.any():
        rejected["a comparison, kink or tie is within rounding of its boundary"] += int(newly.sum())
    return keep & ~ambiguous


def _accepted_points(batch: int, dtype: torch.dtype, rejected: Counter, keep: np.ndarray, checks: list,
                     bounded: bool = True) -> np.ndarray:
    """Points where every reference value is defined, fits the dtype with room to spare, is
    no subnormal number, and has a finite error bound.

    The others are counted by reason and left out: there the math is undefined, or the
    result overflows or underflows the dtype, or a step on the way does (a NaN from inf - inf
    on the way counts as that step's overflow). Without ``bounded`` (the bounds are not
    computed yet) NaN is let through: only a bound tells an undefined value from a lost step.
    """
    keep = keep.copy()
    limit = representable_limit(dtype)
    tiny = underflow_limit(dtype)
    dtype_name = str(dtype).replace("torch.", "")
    for label, (value, error) in checks:
        value = value.reshape(batch, -1)
        magnitude = np.abs(value)
        with np.errstate(all="ignore"):
            if bounded:
                error = error.reshape(batch, -1)
                lost = ~np.isfinite(error)
                defined = ~(np.isnan(value) & ~lost).any(axis=1)
                room = allowed_error(magnitude, error, dtype)
                room = np.where(np.isfinite(room), room, 0)  # an unbounded step has its own reason
                fits = ~(magnitude + room > limit).any(axis=1)
            else:  # the room grows with the magnitude: the largest element decides
                lost = np.zeros((batch, 1), dtype=bool)
                defined = np.ones(batch, dtype=bool)
                largest = np.fmax.reduce(magnitude, axis=1)
                fits = ~(largest + allowed_error(largest, 0.0, dtype) > limit)
        normal = ~((magnitude < tiny) & (value != 0)).any(axis=1)
        for reason, bad in ((f"{label} is undefined", ~defined),
                            (f"{label} overflows {dtype_name}", ~fits),
                            (f"{label} underflows {dtype_name}", ~normal),
                            (f"a step of {label} overflows or underflows {dtype_name}", lost.any(axis=1))):
            newly = keep & bad
            if newly.any():
                rejected[reason] += int(newly.sum())
                keep &= ~bad
    return keep


def _agreeing(reference, floor, actual, dtype) -> np.ndarray:
    """Per point, whether every element of ``actual`` is within the tolerance of the error
    bound's floor, a tolerance that fits the dtype: where the floor is huge, the bounds decide
    whether the point counts at all."""
    with np.errstate(all="ignore"):  # inf and NaN are not within any tolerance
        magnitude = np.abs(reference)
        allowed = allowed_error(magnitude, floor, dtype)
        ok = np.abs(actual - reference) <= allowed
        limit = representable_limit(dtype)
        if not np.max(magnitude, initial=0.0) + np.max(allowed, initial=0.0) <= limit:
            ok &= magnitude + allowed <= limit
    return ok.reshape(len(ok), -1).all(axis=1)


def _compare(reference, error, actual, dtype):
    """(first failing point, allowed errors there), or None when every element is within tolerance."""
    allowed = allowed_error(reference, error, dtype)
    ok = np.abs(actual - reference) <= allowed
    bad_points = ~ok.reshape(len(ok), -1).all(axis=1)
    if not bad_points.any():
        return None
    point = int(np.argmax(bad_points))
    return point, allowed[point]


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


def _formula(label: str, tensor: Tensor) -> str:
    index = f"[{', '.join(str(i) for i in tensor.indices)}]" if tensor.indices else ""
    return f"{label}{index} = {tensor.expr}"
