"""Which points are judged, and by which pass: the rules, one by one.

A point, or one check at it, is **rejected** only on the exact math's grounds, each tested by
a planted bug in its regime (``tests/test_acceptance.py``):

1. **Domain.** An op's operand is outside the op's domain (``log`` of a negative number).
2. **The dtype cannot hold a step.** For the spec's own torch lowering only, a node's value
   overflows the dtype: torch executes the spec's steps, so ``exp(100)`` being inf in float32
   is right. A user's function computes its own way, so
   there the spec's steps never reject a point. An op whose kernel computes its sympy
   form's steps (``norm`` squares its elements) has them judged as steps of the spec.
3. **The dtype cannot hold the result.** The quantity checked (a value, VJP, JVP, HVP or
   claim) overflows the dtype, or is undefined. A quantity that underflows is judged: the
   allowance's absolute term covers what the dtype can hold of it.
4. **Too close to call.** A comparison, kink or tie is within rounding of its boundary in
   the float64 pass, where torch may go either way. In the exact pass, one check is
   rejected (not its point) where one rounding of the spec's steps reaches a singularity of
   it, so that no finite allowance exists: ``acosh(1 + exp(-x))`` at x = 40 in float64,
   whose 1 + exp(-x) rounds to 1, where acosh' is infinite. A Hessian-vector product
   differentiates the backward, so it goes with them.

5. **Ties of sort and topk.** A tie at topk's boundary changes what it selects: the
   derivatives through it are not judged at the point. A tie among the elements it orders
   permutes where their gradients go, and each order is a valid derivative: the spec's own
   stable ``sort`` orders them as its sympy form does, and is judged; elsewhere (topk, a
   user's function) the code's order is not known, and the derivatives through the tie are
   not judged (``tied_orders``). A tie that topk leaves out changes nothing, and is judged.

No rule comes before a non-finite result: where torch gives inf or NaN and the exact value is
finite and the dtype holds it, the point fails (``verify.checks``), whatever a rule would say.
A domain verdict stands on the exact value's sign and distance to the edge, never on a rounded
one. A step of the spec's own torch backward or forward mode (an adjoint, a tangent) that
overflows leaves out the derivatives along it (rule 2, for those steps); a step that
underflows to 0 where the exact value is not 0 rejects the spec's own lowering there, as
torch's steps then divide by 0 rightly.

Each rule is applied only where the reference can tell. A float64 value with a finite,
small error bound can tell; a value whose bound was lost (a float64 step overflowed or
underflowed) cannot, and its point goes to the exact pass (``verify.oracle.exact_point``),
which decides the same rules on exact values. A bound that is infinite where no step left its
dtype's range is the model's own arithmetic past float64's (scores near 1e160 carry errors
near 1e144, and their softmax may be anything): no finite allowance, so no rule of the range
can matter, and the point is judged, its elements weak; torch not finite there still fails.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ir import Apply
from .ops import REGISTRY, single_axis
from .oracle import node_arrays
from .strategies import Example
from .tolerance import UNIT_ROUNDOFF, Precision, allowed_error, extra_allowance, overflows, smallest_subnormal

if TYPE_CHECKING:
    from .plan import Plan

AMBIGUOUS = "a comparison, kink or tie is within rounding of its boundary"
FLOAT64_SMALLEST = 5e-324
UNBOUNDED = "{}: one rounding of the spec's steps reaches a singularity (no finite allowance)"


def inside_domains(prepared: Plan, example: Example, values: dict, rejected: Counter, how: str = "bounds",
                   gaps: dict | None = None, model: Precision | None = None) -> tuple:
    """(points inside every op's domain, points the values cannot tell) by rule 1. A point
    outside counts with the op's domain as the reason where its values tell; else it is left to
    a closer pass. ``how`` is as for ``accepted_points``. An element is surely outside where
    the predicate fails at every corner of its operands' boxes: within the float64 values'
    own error (``own_error`` of their bounds under ``model``) with "bounds", within ``gaps``
    (label -> how far an exact value may be from its float64 midpoint) with "exact". log1p at -1 + 1e-20, whose float64 value is -1, is not
    surely outside; the exact pass judges it, inside."""
    keep = np.ones(example.batch, dtype=bool)
    doubtful = np.zeros(example.batch, dtype=bool)
    array_of = node_arrays(prepared, example, values)
    if how == "exact":
        offset_of = node_arrays(prepared, example, {label: (values[label][0], gap) for label, gap in gaps.items()},
                                errors=True)
    else:
        error_of = node_arrays(prepared, example, values, errors=True)

        def offset_of(operand, rank):  # twice: a corner half a float64 spacing away would round back
            return 2 * own_error(0.0, np.asarray(error_of(operand, rank)), model)
    for label, node, op, predicate, domain in _domains(prepared):
        rank = max(o.rank for o in node.operands) if op.kind == "elementwise" else 0
        operands = [array_of(o, rank) for o in node.operands]
        with np.errstate(all="ignore"):
            inside = np.asarray(predicate(*operands), dtype=bool)
        outside = keep & ~np.broadcast_to(_per_point(inside, np.all), keep.shape)
        if not outside.any():
            continue
        if how == "floor":
            sure = np.zeros(example.batch, dtype=bool)
        else:
            sure = _surely_outside(predicate, operands, [offset_of(o, rank) for o in node.operands], example.batch)
        if (outside & sure).any():
            rejected[f"{label} is outside the domain of {domain}"] += int((outside & sure).sum())
        if how == "exact":  # within a float64 gap of the edge: the exact value's own rules judge it
            keep &= ~(outside & sure)
            continue
        doubtful |= outside & ~sure
        keep &= ~outside
    return keep, doubtful


def _surely_outside(predicate, operands: list, offsets: list, batch: int) -> np.ndarray:
    """Per point, whether ``predicate`` fails at every corner of the box of operands within
    ``offsets`` of them, at some element whose offsets are all finite (an exact operand,
    offset 0, stays as it is: a signed zero). An element overflowed elsewhere in the point
    does not hide one surely outside."""
    surely = True
    with np.errstate(all="ignore"):
        for signs in itertools.product((-1, 1), repeat=len(operands)):
            corner = [np.where(off == 0, a, a + sign * off) for a, off, sign in zip(operands, offsets, signs)]
            surely = surely & ~np.asarray(predicate(*corner), dtype=bool)
    finite = np.ones((), dtype=bool)
    for offset in offsets:
        finite = finite & np.isfinite(offset)
    surely = np.asarray(surely)
    try:
        elementwise = surely.shape == np.broadcast_shapes(surely.shape, finite.shape)
    except ValueError:
        elementwise = False
    if not elementwise:  # a predicate over a whole axis
        return np.broadcast_to(_per_point(surely) & _per_point(finite, np.all), (batch,))
    return np.broadcast_to(_per_point(surely & finite), (batch,))


def _domains(prepared: Plan):
    """(label, node, op, predicate, what the domain is) for each op's domain, and its
    derivative's where that is less."""
    for label, node in prepared.nodes.items():
        op = REGISTRY[node.op] if isinstance(node, Apply) else None
        if op is not None and op.defined is not None:
            yield label, node, op, op.defined, f"{node.op}: {op.domain}"
        if op is not None and op.differentiable is not None:
            yield label, node, op, op.differentiable, f"{node.op}'s derivative: {op.domain}"


TIED_SELECTION = "{check}: topk's k-th and (k+1)-th largest are tied in {label} (what it selects depends on the order)"
TIED_ORDER = "{check}: tied elements of {label} ({op}) may take any order, and the code's is not known"


def tied_orders(prepared: Plan, example: Example, values: dict, spec_lowering: bool, rejected: Counter,
                among: np.ndarray) -> dict:
    """Rule 5 (ties of sort and topk): check label -> per point, whether it is not judged
    there, counted at the points ``among``. A tie at topk's boundary changes what it selects: the derivatives through
    it are not judged. A tie among the elements sorted or selected permutes where their
    gradients go, and each order is a valid derivative: the spec's own ``sort`` orders them by
    position, as the sympy form does, and is judged; where the code's order is not known (its
    topk, a user's function), the derivatives through the tie are not judged. Elsewhere, as
    beside tied elements left out of a topk, they are."""
    spec = prepared.spec
    output = spec.output
    array_of = node_arrays(prepared, example, values)
    skipped = {}
    for label, node in prepared.nodes.items():
        op = REGISTRY[node.op] if isinstance(node, Apply) else None
        if op is None or not op.ties:
            continue
        (operand,) = node.operands
        rows = np.asarray(array_of(operand, operand.rank), dtype=np.float64)
        axis = single_axis(dict(node.params), operand.rank) + 1
        ordered = -np.sort(-np.moveaxis(rows, axis, -1), axis=-1)
        k = node.param("k", ordered.shape[-1])
        boundary = _per_point(ordered[..., k - 1] == ordered[..., k]) if k < ordered.shape[-1] else False
        inside = _per_point(ordered[..., 1:k] == ordered[..., :k - 1])
        if op.ties == "stable" and spec_lowering:
            inside = False
        reached = _descendants(node) - {id(node)}  # its own gradient, the adjoint of its result, is one
        checks = [f"∂{output}/∂{name}" for name in [*spec.inputs, *spec.nodes] if id(spec.variable(name)) in reached]
        checks += [f"the JVP of {output}", *(f"the Hessian-vector product of {name}" for name in spec.inputs)]
        for reason, points in ((TIED_SELECTION, boundary), (TIED_ORDER, inside)):
            points = np.broadcast_to(points, (example.batch,))
            for check in checks:
                newly = points & among & ~skipped.get(check, False)
                if newly.any():
                    rejected[reason.format(check=check, label=label, op=node.op)] += int(newly.sum())
                    skipped[check] = skipped.get(check, False) | points
    return skipped


def _descendants(node) -> set:
    """The ids of every node ``node`` is computed from, itself included."""
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if id(current) not in found:
            found.add(id(current))
            stack.extend(current.args)
    return found


def unambiguous(keep: np.ndarray, ambiguous: np.ndarray, rejected: Counter) -> np.ndarray:
    """``keep`` less the points where a comparison was too close to call, counted (rule 4)."""
    newly = keep & ambiguous
    if newly.any():
        rejected[AMBIGUOUS] += int(newly.sum())
    return keep & ~ambiguous


def unbounded(pair: tuple) -> bool:
    """Whether the exact pass's model gives a finite value no finite allowance (rule 4, per check)."""
    value, bound = pair
    return bool((np.isinf(bound) & np.isfinite(value)).any())


def step(label: str, pair: tuple, stable: bool) -> tuple:
    """A node's value in the spec's own torch lowering: judged by rules 2 and 3."""
    return label, pair, "stable step" if stable else "step", {}


def quantity(label: str, pair: tuple, reads: dict | None = None) -> tuple:
    """A checked quantity: judged by rule 3, as are the values it is computed from (``reads``:
    node label -> its pair), where its derivative formula reads them as torch's backward does
    (expm1's backward reads expm1(x): where that overflows, so may the gradient, even of a zero
    cotangent)."""
    return label, pair, "quantity", reads or {}


def accepted_points(batch: int, model: Precision, rejected: Counter, keep: np.ndarray, checks: list,
                    how: str = "bounds", skipped: dict | None = None, float64_bounds=None,
                    left_range: np.ndarray | None = None) -> tuple:
    """(points judged, points left to a closer pass) by rules 2 and 3, for ``checks`` made by
    ``step`` and ``quantity``. The rest are counted by reason. A quantity the dtype cannot
    hold drops that check alone, not its point (an overflowing value leaves the gradients
    judged), where ``skipped`` (label -> per point, whether that check is dropped) is given.
    Where a quantity's bound is lost to a step that overflows the dtype (not float64),
    ``float64_bounds()`` (label -> float64's own bound, in its u) still decides whether the
    quantity is beyond the dtype's range. ``left_range`` (per point, the context's) says where
    a step left its dtype's range: elsewhere an infinite bound is no lost one but the model's
    own arithmetic past float64's range, no finite allowance, and the point is judged (weak).

    ``how`` says what the values are: "floor" (float64 without bounds: every doubt goes on,
    to the bounds), "bounds" (float64 with error bounds: a lost bound, or a value too
    uncertain to decide a rule, goes on, to the exact pass) or "exact" (midpoints of the
    exact pass beside their modelled bounds: every rule is decided). Ranges are those of
    ``model``'s stored dtype.
    """
    keep = keep.copy()
    doubtful = np.zeros(batch, dtype=bool)
    dtype = model.dtype
    half_smallest = smallest_subnormal(dtype) / 2
    for label, (value, error), kind, reads in checks:
        shape = np.shape(value)
        error = np.broadcast_to(error, shape).reshape(batch, -1)
        value = value.reshape(batch, -1)
        magnitude = np.abs(value)
        with np.errstate(all="ignore"):
            if how == "bounds":
                # A bound lost to an overflowing step of the formula (inf), or to float64's own
                # underflow (NaN): the float64 value cannot tell. An infinite bound where no step
                # left the range allows any value: no rule of the range can matter there.
                overflowed = np.isinf(error)
                if left_range is not None:
                    unbounded = overflowed & ~left_range[:, None]
                    overflowed &= ~unbounded
                else:
                    unbounded = np.zeros(value.shape, dtype=bool)
                lost = ~np.isfinite(error) & ~unbounded
                off = np.where(lost | unbounded, 0.0, own_error(value, error, model))
                known = np.zeros(value.shape, dtype=bool)  # lost, yet float64's own bound is known
                if kind == "quantity" and float64_bounds is not None and overflowed.any():
                    own = np.broadcast_to(float64_bounds()[label], shape).reshape(batch, -1)
                    known = lost & np.isfinite(own)
                    off = np.where(known, UNIT_ROUNDOFF[torch.float64] * own, off)
                room = np.where(lost | unbounded, 0.0, allowed_error(error, model))
            else:  # exact values beside their bounds, or (floor) values whose room is one rounding's
                overflowed = lost = known = unbounded = np.zeros(value.shape, dtype=bool)
                off = 0.0
                # As in the float64 pass: a result the allowance lets round past the largest
                # number may be inf (c * log_softmax(x) at 65502.55 in float16, its factor 8880
                # for 8877 giving 65527).
                room = allowed_error(magnitude if how == "floor" else np.nan_to_num(error, posinf=0.0), model)
            undefined = np.isnan(value) & ~lost
            overflow = ~lost & ~unbounded & overflows(magnitude, room, dtype)
            # The exact pass decides by the model: a result its allowance lets round to inf may.
            surely_over = overflow if how == "exact" else ~unbounded & overflows(magnitude - off, 0.0, dtype)
            # Nonzero, yet below half the dtype's smallest number: it rounds to 0 there (an exact
            # value below float64's range comes as its smallest number, sign kept). A float64
            # zero computed with an error may be such an underflow too: the point is judged, and
            # where it disagrees, the exact pass decides it by these rules again.
            vanishing = ~lost & ~unbounded & (value != 0) & ((magnitude + off < half_smallest) |
                                                             (magnitude <= FLOAT64_SMALLEST))
        if how == "floor":  # without bounds only a step that overflowed float64 itself is decided
            if kind == "step":
                over = keep & _per_point(np.isinf(value))
                if over.any():
                    rejected[f"{label} overflows {model.name}"] += int(over.sum())
                    keep &= ~over
            doubtful |= keep & _per_point(undefined | overflow)
            continue
        reasons = [(f"{label} is undefined", undefined),
                   (f"{label} overflows {model.name}", (overflow | known) & surely_over)]
        for name, (read, read_error) in reads.items():
            read, read_error = read.reshape(batch, -1), np.broadcast_to(read_error, np.shape(read)).reshape(batch, -1)
            with np.errstate(all="ignore"):
                off = 0.0 if how != "bounds" else np.where(np.isfinite(read_error), own_error(read, read_error, model), 0)
                beyond = _per_point(overflows(np.abs(read) - off, 0.0, dtype) | np.isinf(read))
            reasons.append((f"{label} is computed from {name}, which overflows {model.name}",
                            np.broadcast_to(beyond[:, None], value.shape)))
        if kind == "step":
            left = f"a step of {label} leaves {model.name}'s range (an overflow, or a partial product flushed to 0)"
            reasons.append((left, overflowed))
            reasons.append((f"{label} underflows to 0 in {model.name}", vanishing))
        decided = np.zeros(value.shape, dtype=bool)
        dropped = np.zeros(batch, dtype=bool)
        for reason, bad in reasons:
            newly = keep & ~dropped & _per_point(bad)
            if newly.any():
                rejected[reason] += int(newly.sum())
                if kind == "quantity" and skipped is not None:
                    dropped |= newly
                else:
                    keep &= ~newly
            decided |= bad
        if dropped.any():
            skipped[label] = skipped.get(label, np.zeros(batch, dtype=bool)) | dropped
        unsure = lost | overflow & ~surely_over
        doubtful |= keep & _per_point(unsure & ~decided)
    # A point that a rule rejected needs no closer pass, whatever else was doubtful there.
    return keep & ~doubtful, keep & doubtful


def _per_point(array, reduce=np.any) -> np.ndarray:
    array = np.asarray(array)
    if not array.ndim:
        return array
    return reduce(array.reshape(array.shape[0], -1), axis=1)


def agreeing(reference, floor, actual, model: Precision, slack: tuple = (0.0, 0.0),
             exact: bool = False) -> tuple:
    """(per point, whether every element of ``actual`` is within the tolerance of the error
    bound's floor, less the float64 reference's own error (``exact``: as ``own_error``), that
    tolerance). Where the floor is huge, the bounds decide whether the point counts at all."""
    with np.errstate(all="ignore"):  # inf and NaN are not within any tolerance
        magnitude = np.abs(reference)
        allowed = allowed_error(floor, model, reference) + extra_allowance(magnitude, slack)
        ok = np.abs(actual - reference) + own_error(reference, floor, model, exact) <= allowed
        if np.any(overflows(np.max(magnitude, initial=0.0), np.max(allowed, initial=0.0), model.dtype)):
            ok &= ~overflows(magnitude, allowed, model.dtype)
    return ok.reshape(len(ok), -1).all(axis=1), allowed


def own_error(reference, error, model: Precision, exact: bool = False):
    """What the float64 reference may be off by: a float64 rounding per step, where the model
    counts one of the code's (at its ratio: so at most the bound over the smallest ratio,
    times u of float64), and the numeric functions it calls are as accurate as the model
    takes torch's to be; an ``exact`` reference (a midpoint of the exact pass) by one float64
    rounding of its value."""
    own = np.abs(reference) if exact else np.abs(error) / min(model.kernel_ratio, 1.0)
    return UNIT_ROUNDOFF[torch.float64] * own


def disagreeing(reference, error, actual, model: Precision, exact: bool = False,
                slack: tuple = (0.0, 0.0)) -> tuple:
    """(points where ``actual`` is certainly off by more than the allowance, points where that
    is within the float64 reference's own error (``own_error``) of it, the allowance); the
    latter are left to the exact pass."""
    with np.errstate(all="ignore"):
        allowed = allowed_error(error, model, reference) + extra_allowance(np.abs(reference), slack)
        distance = np.abs(actual - reference)
        own = own_error(reference, error, model, exact)
        # Torch not finite where float64 is: a disagreement whatever the allowance (even an
        # infinite one), for the exact pass to decide.
        over = ~(distance <= allowed + own) | ~np.isfinite(actual) & np.isfinite(reference)
        near = ~over & (distance > allowed - own)
    failing = _per_point(over)
    return failing, _per_point(near) & ~failing, allowed
