"""Which points are judged, and by which pass: the rules, one by one.

A point, or one check at it, is **rejected** only on the exact math's grounds, each tested by
a planted bug in its regime (``tests/test_acceptance.py``):

1. **Domain.** An op's operand is outside the op's domain (``log`` of a negative number).
2. **The dtype cannot hold a step.** For the spec's own torch lowering only, a node's value
   overflows the dtype or is a subnormal number there: torch executes the spec's steps, so
   ``exp(100)`` being inf in float32 is right. A user's function computes its own way, so
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

Each rule is applied only where the reference can tell. A float64 value with a finite,
small error bound can tell; a value whose bound was lost (a float64 step overflowed or
underflowed) cannot, and its point goes to the exact pass (``verify.oracle.exact_point``),
which decides the same rules on exact values.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ir import Apply
from .ops import REGISTRY
from .oracle import node_arrays
from .strategies import Example
from .tolerance import UNIT_ROUNDOFF, allowed_error, extra_allowance, representable_limit, underflow_limit

if TYPE_CHECKING:
    from .plan import Plan

AMBIGUOUS = "a comparison, kink or tie is within rounding of its boundary"
UNBOUNDED = "{}: one rounding of the spec's steps reaches a singularity (no finite allowance)"


def inside_domains(prepared: Plan, example: Example, values: dict, rejected: Counter, how: str = "bounds",
                   gaps: dict | None = None) -> tuple:
    """(points inside every op's domain, points the values cannot tell) by rule 1. A point
    outside counts with the op's domain as the reason where its values tell; else it is left to
    a closer pass. ``how`` is as for ``accepted_points``. An element is surely outside where
    the predicate fails at every corner of its operands' boxes: within twice their error
    bound with "bounds", within ``gaps`` (label -> how far an exact value may be from its
    float64 midpoint) with "exact". log1p at -1 + 1e-20, whose float64 value is -1, is not
    surely outside; the exact pass judges it, inside."""
    keep = np.ones(example.batch, dtype=bool)
    doubtful = np.zeros(example.batch, dtype=bool)
    array_of = node_arrays(prepared, example, values)
    if how == "exact":
        offset_of = node_arrays(prepared, example, {label: (values[label][0], gap) for label, gap in gaps.items()},
                                errors=True)
    else:
        error_of = node_arrays(prepared, example, values, errors=True)

        def offset_of(operand, rank):
            return 2 * UNIT_ROUNDOFF[torch.float64] * np.asarray(error_of(operand, rank))
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
    return label, pair, "stable step" if stable else "step"


def quantity(label: str, pair: tuple) -> tuple:
    """A checked quantity: judged by rule 3."""
    return label, pair, "quantity"


def accepted_points(batch: int, dtype: torch.dtype, rejected: Counter, keep: np.ndarray, checks: list,
                    how: str = "bounds", computed: torch.dtype | None = None) -> tuple:
    """(points judged, points left to a closer pass) by rules 2 and 3, for ``checks`` made by
    ``step`` and ``quantity``. The rest are counted by reason.

    ``how`` says what the values are: "floor" (float64 without bounds: every doubt goes on,
    to the bounds), "bounds" (float64 with error bounds: a lost bound, or a value too
    uncertain to decide a rule, goes on, to the exact pass) or "exact" (midpoints of the
    exact pass: every rule is decided).
    ``computed`` is the dtype a kernel computes in where it is not ``dtype`` (the
    compute-dtype rule of ``verify.tolerance``); ranges are always ``dtype``'s.
    """
    keep = keep.copy()
    doubtful = np.zeros(batch, dtype=bool)
    limit = representable_limit(dtype)
    tiny = underflow_limit(dtype)
    dtype_name = str(dtype).replace("torch.", "")
    for label, (value, error), kind in checks:
        error = np.broadcast_to(error, np.shape(value)).reshape(batch, -1)
        value = value.reshape(batch, -1)
        magnitude = np.abs(value)
        with np.errstate(all="ignore"):
            if how == "bounds":
                lost = ~np.isfinite(error)
                # What the float64 value may be off by: its first-order bound, twice.
                off = np.where(lost, 0.0, 2 * UNIT_ROUNDOFF[torch.float64] * error)
                room = np.where(lost, 0.0, allowed_error(magnitude, error, dtype, computed))
            else:  # exact values, or (floor) values whose room is only the floor's
                lost = np.zeros(value.shape, dtype=bool)
                off = 0.0
                room = allowed_error(magnitude, 0.0, dtype, computed) if how == "floor" else 0.0
            undefined = np.isnan(value) & ~lost
            # A step that overflowed float64 too, or whose value is beyond the dtype's range.
            overflow = (~lost | (kind == "step")) & (magnitude + room > limit)
            underflow = ~lost & (magnitude < tiny) & (value != 0)
        if how == "floor":  # without bounds only a step that overflowed float64 itself is decided
            if kind == "step":
                over = keep & _per_point(np.isinf(value))
                if over.any():
                    rejected[f"{label} overflows {dtype_name}"] += int(over.sum())
                    keep &= ~over
            doubtful |= keep & _per_point(undefined | overflow | (underflow if kind != "quantity" else False))
            continue
        with np.errstate(all="ignore"):
            surely_over = lost | (magnitude - off > limit)
            surely_under = magnitude + off < tiny
        reasons = [(f"{label} is undefined", undefined),
                   (f"{label} overflows {dtype_name}", overflow & surely_over)]
        if kind != "quantity":
            reasons.append((f"{label} underflows {dtype_name}", underflow & surely_under))
        if kind == "step":
            reasons.append((f"a step of {label} overflows {dtype_name}", lost))
        decided = np.zeros(value.shape, dtype=bool)
        for reason, bad in reasons:
            newly = keep & _per_point(bad)
            if newly.any():
                rejected[reason] += int(newly.sum())
                keep &= ~newly
            decided |= bad
        unsure = lost | overflow & ~surely_over | (underflow & ~surely_under if kind != "quantity" else False)
        doubtful |= keep & _per_point(unsure & ~decided)
    return keep & ~doubtful, doubtful


def _per_point(array, reduce=np.any) -> np.ndarray:
    array = np.asarray(array)
    if not array.ndim:
        return array
    return reduce(array.reshape(array.shape[0], -1), axis=1)


def agreeing(reference, floor, actual, dtype, slack: tuple = (0.0, 0.0), computed=None) -> np.ndarray:
    """Per point, whether every element of ``actual`` is within the tolerance of the error
    bound's floor, a tolerance that fits the dtype: where the floor is huge, the bounds decide
    whether the point counts at all."""
    with np.errstate(all="ignore"):  # inf and NaN are not within any tolerance
        magnitude = np.abs(reference)
        allowed = allowed_error(magnitude, floor, dtype, computed) + extra_allowance(magnitude, slack)
        ok = np.abs(actual - reference) <= allowed
        limit = representable_limit(dtype)
        if not np.max(magnitude, initial=0.0) + np.max(allowed, initial=0.0) <= limit:
            ok &= magnitude + allowed <= limit
    return ok.reshape(len(ok), -1).all(axis=1)


def disagreeing(reference, error, actual, dtype, exact: bool = False, slack: tuple = (0.0, 0.0),
                computed=None) -> tuple:
    """(points where ``actual`` is certainly off by more than the allowance, points where that
    is within the float64 reference's own error of it, the allowance).

    The float64 reference is off by at most u · error (twice that, for a first-order bound),
    so a distance that close to the allowance is left to the exact pass; an ``exact``
    reference is off by less than a float64 rounding of its value.
    """
    with np.errstate(all="ignore"):
        allowed = allowed_error(reference, error, dtype, computed) + extra_allowance(np.abs(reference), slack)
        distance = np.abs(actual - reference)
        own = 2 * UNIT_ROUNDOFF[torch.float64] * (np.abs(reference) + (0 if exact else np.abs(error)))
        over = ~(distance <= allowed + own)
        near = ~over & (distance > allowed - own)
    failing = _per_point(over)
    return failing, _per_point(near) & ~failing, allowed
