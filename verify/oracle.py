"""The reference side of a batch: the plan's formulas at its points.

Float64 is the fast path: ``reference_values`` and ``reference_derivatives`` evaluate each
formula with its error bound (or, without ``bounded``, with only the bound's floor).

Where float64 cannot certify a point, ``exact_point`` evaluates it in arb balls
(``verify.balls``), raising the precision until every comparison in its formulas is decided
and every result is known far below a float64 ulp. Nothing overflows on the way:
``log(1 + exp(x))`` at x = 800 is 800, and its derivative 1. Beside each exact value is an
a priori bound, the formula over the magnitudes of its terms (what a computation that rounds
each term may be off by), exact too: the float64 reference's own overflow never widens an
allowance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import balls
from .ir import Apply, Constant, Ref, SizeRef
from .lower.sympy import ADJOINT_PREFIX, COTANGENT, TANGENT_PREFIX, adjoint_name, tangent_name
from .ops import REGISTRY
from .reference import ERROR_DTYPE, Context, Reference, per_point
from .strategies import Example
from .tolerance import SECOND_ORDER, UNIT_ROUNDOFF, Precision

if TYPE_CHECKING:
    from .plan import Plan


@dataclass
class ReferenceSide:
    """The reference on a batch; each entry is a (value, error bound) pair, or with
    ``bounded=False`` a (value, floor of the error bound) pair."""

    values: dict  # label -> pair
    gradients: dict  # name -> the VJP with the example's cotangent
    claimed: list  # per claim: (claimed form, sympy's derivative)
    jvp: tuple | None
    hvps: dict

    def pairs(self) -> list:
        return [*self.values.values(), *self.gradients.values(), *(p for both in self.claimed for p in both),
                *([self.jvp] if self.jvp is not None else []), *self.hvps.values()]

    def combined(self, other: ReferenceSide, combine) -> ReferenceSide:
        """A side whose every pair is ``combine(this side's pair, the other's)``."""
        def each(mine: dict, theirs: dict) -> dict:
            return {name: combine(pair, theirs[name]) for name, pair in mine.items()}

        return ReferenceSide(each(self.values, other.values), each(self.gradients, other.gradients),
                             [(combine(a, c), combine(b, d)) for (a, b), (c, d) in zip(self.claimed, other.claimed)],
                             None if self.jvp is None else combine(self.jvp, other.jvp),
                             each(self.hvps, other.hvps))


def reference_side(prepared: Plan, example: Example, model: Precision, order: int = 1,
                   forward: bool = False) -> ReferenceSide:
    """The reference at every point of ``example``: values, VJPs, claims, and (as asked) the
    JVP and Hessian-vector products."""
    ctx, values = reference_values(prepared, example, model)
    return ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, order, forward))


def reference_values(prepared: Plan, example: Example, model: Precision, bounded: bool = True) -> tuple:
    """(context, node label -> (value, error bound)) at every point of ``example``, the bounds
    by the allowance's model of code of precision ``model``. Without ``bounded``, the error
    bounds are only floors, and cost no error arithmetic."""
    # The inputs are exact: drawn in the dtype, as the code under test receives them.
    exact = np.zeros((), dtype=ERROR_DTYPE)
    ctx = Context({name: (array, np.broadcast_to(exact, array.shape)) for name, array in example.inputs.items()},
                  example.sizes, example.batch, model)
    if prepared.spec.nodes[prepared.spec.output].shape:
        ctx.env[COTANGENT] = (example.cotangent, np.broadcast_to(exact, example.cotangent.shape))
    for name, tangent in (example.tangents or {}).items():
        ctx.env[tangent_name(name)] = (tangent, np.broadcast_to(exact, tangent.shape))
    values = {}
    output = prepared.spec.output
    for name, reference in prepared.values.items():  # in graph order, so the operands' entries are ready
        pair = reference(ctx) if bounded else reference.estimate(ctx)
        values[name] = _enter(ctx, name, _returned(pair, model) if name == output else pair, exact=False)
    if bounded:
        # An op's kernel model (a solve's norm-wise error) widens only what depends on that op.
        amplifications = _amplifications(prepared, example, values, model.dtype, "forward_condition")
        values = {name: _amplified(pair, _local(amplifications, prepared.upstream[name]))
                  for name, pair in values.items()}
    return ctx, values


def reference_derivatives(prepared: Plan, example: Example, ctx: Context, values: dict, order: int,
                          forward: bool, bounded: bool = True, exact: bool = False,
                          derivatives: dict | None = None, jvp: tuple | None = None) -> tuple:
    """(VJPs, claims, JVP, Hessian-vector products) in the context of ``reference_values``,
    or with ``exact`` of the exact pass (balls); ``derivatives`` (name -> pair) and ``jvp``,
    where given, are the gradients before any cotangent and the JVP."""
    amplifications = _amplifications(prepared, example, values, ctx.model.dtype, "backward_condition") if bounded else {}

    def evaluated(reference: Reference) -> tuple:
        if exact:
            return reference.exact(ctx)
        return reference(ctx) if bounded else reference.estimate(ctx)

    def widened(pair: tuple, name: str | None = None) -> tuple:
        """``pair`` widened by the kernel models of the ops whose backward it passes through:
        for ∂o/∂name those that use name; for a JVP or HVP, every one."""
        through = None if name is None else [op for op in amplifications if op != name
                                             and name in prepared.upstream[op]]
        return _amplified(pair, _local(amplifications, through), of_terms=True)

    if derivatives is None:
        derivatives = backward(prepared, ctx, evaluated, exact)
    # A scalar output's formulas hold no cotangent: its VJP is the gradient times the cotangent.
    seed = None if prepared.spec.nodes[prepared.spec.output].shape else example.cotangent
    model = ctx.model

    def returned(pair):
        return pair if exact else _returned(pair, model)

    gradients = {name: returned(widened(_times(pair, seed, ctx, exact), name)) for name, pair in derivatives.items()}
    claimed = [(evaluated(claim.reference), derivatives[claim.wrt] if claim.kind == "grad" else evaluated(claim.derivative))
               for claim in prepared.claims]
    if forward:
        jvp = returned(widened(forward_chained(prepared, ctx, evaluated, exact) if jvp is None else jvp))
    hvps = ({name: returned(widened(_second_order(_times(evaluated(reference), seed, ctx, exact), exact)))
             for name, reference in prepared.second_order().items()} if order == 2 else {})
    return gradients, claimed, jvp, hvps


def backward(prepared: Plan, ctx: Context, evaluated, exact: bool) -> dict:
    """∂o/∂name for the inputs and named nodes, one op at a time from the output back, each
    adjoint entered in ``ctx`` for the formulas of its operands'. ``evaluated`` gives a
    Reference's pair in ``ctx``."""
    adjoints = {}
    for label in reversed(prepared.nodes):
        if label in prepared.adjoints:
            adjoints[label] = _enter(ctx, adjoint_name(label), evaluated(prepared.adjoints[label]), exact)
    return {name: adjoints[name] for name in prepared.gradients}


def forward_chained(prepared: Plan, ctx: Context, evaluated, exact: bool) -> tuple:
    """The JVP: each node's tangent, one op at a time from the inputs (whose tangents ``ctx``
    holds), entered in ``ctx``; the output's is returned."""
    tangents, pair = prepared.forward_mode(), None
    for label in prepared.nodes:
        if label in tangents:
            pair = _enter(ctx, tangent_name(label), evaluated(tangents[label]), exact)
    return pair  # the output's: it comes last in graph order


def _enter(ctx: Context, name: str, pair: tuple, exact: bool) -> tuple:
    """A step's ``pair`` (a node's value, adjoint or tangent) under ``name`` in ``ctx``, for
    the formulas of the steps that use it, and returned. In the exact pass a ball is its own
    bound."""
    ctx.env[name] = (pair[0], np.zeros(np.shape(pair[0]))) if exact else pair
    return pair


def _second_order(pair: tuple, exact: bool) -> tuple:
    """A Hessian-vector product's (value, bound): torch's double backward composes the backward's
    own formulas, so its bound is SECOND_ORDER times that of the formula (in the exact pass,
    ``_with_bounds`` multiplies the whole bound)."""
    if exact:
        return pair
    value, bound = pair
    return value, bound * SECOND_ORDER


# A kernel's store to the dtype may round in any mode, a whole ulp (two units of u): Triton
# offers fp_downcast_rounding="rtz", and its interpreter truncates (docs/findings.md).
STORED_ROUNDINGS = 2


def _returned(pair: tuple, model: Precision) -> tuple:
    """What a kernel that computes everything (``compute_dtype``) returns: its result, stored
    once in the dtype in any rounding mode (where each op stores its own, its kernel did)."""
    if not model.fused:
        return pair
    value, error = pair
    with np.errstate(all="ignore"):
        return value, error + np.where(np.asarray(error) > 0, STORED_ROUNDINGS * np.abs(value), 0.0)


def _times(pair: tuple, seed, ctx: Context, exact: bool) -> tuple:
    """(value, error) times a per-point scalar: torch's backward multiplies the cotangent in,
    a rounding wherever it is not a power of 2 (the seeds are exact in every dtype)."""
    if seed is None:
        return pair
    value, error = pair
    factor = seed.reshape((len(seed),) + (1,) * (np.ndim(value) - 1))
    power_of_two = np.abs(np.frexp(factor)[0]) == 0.5
    if exact:
        factor = balls.to_balls(factor)
        product = value * factor
        return np.where(power_of_two, product, balls.rounded(product)), error * np.abs(factor)
    with np.errstate(all="ignore"):  # inf bounds stay inf; the point is rejected later
        product = value * factor
        return product, error * np.abs(factor) + np.where(power_of_two, 0.0, ctx.ratio(False) * np.abs(product))


def _amplifications(prepared: Plan, example: Example, values: dict, dtype: torch.dtype, which: str) -> dict:
    """Op node label -> per point, how much the way torch computes that op amplifies rounding
    (the norm-wise error of a solve), capped at 1/u of float64: ``which`` is the registry's
    ``backward_condition`` (for VJPs, JVPs and HVPs) or ``forward_condition`` (values)."""
    cap = 1 / UNIT_ROUNDOFF[torch.float64]
    found = {}
    array_of = node_arrays(prepared, example, values)
    for label, node in prepared.nodes.items():
        condition = getattr(REGISTRY[node.op], which) if isinstance(node, Apply) else None
        if condition is None or label not in values:
            continue
        with np.errstate(all="ignore"):
            operands = (array_of(o, node.rank if REGISTRY[node.op].kind == "elementwise" else o.rank)
                        for o in node.operands)
            amplification = np.asarray(condition(dtype, values[label][0], *operands), dtype=ERROR_DTYPE)
        amplification = np.nan_to_num(amplification.reshape(example.batch, -1), nan=0.0, posinf=cap)
        found[label] = np.minimum(amplification.max(axis=1), cap)
    return found


def _local(amplifications: dict, labels) -> np.ndarray | None:
    """Per point, the largest amplification of the ops among ``labels`` (None: every op)."""
    chosen = [amplification for label, amplification in amplifications.items() if labels is None or label in labels]
    return np.maximum.reduce(chosen) if chosen else None


def node_arrays(prepared: Plan, example: Example, values: dict, errors: bool = False):
    """A function giving a node's reference values (or with ``errors``, their error bounds:
    0 for inputs and constants, which are exact), with size-1 dims after the batch dim up to
    ``rank``."""
    labels = {id(node): label for label, node in prepared.nodes.items()}

    def array_of(operand, rank):
        while isinstance(operand, Ref):
            operand = operand.target
        if isinstance(operand, Constant):
            return 0.0 if errors else float(operand.value)
        if isinstance(operand, SizeRef):
            return 0.0 if errors else float(example.sizes[operand.symbol.name])
        label = labels[id(operand)]
        if label in example.inputs:
            array = example.inputs[label]
            array = np.zeros(array.shape) if errors else array
        else:
            value, error = values[label]
            array = np.broadcast_to(error, value.shape) if errors else value
        return array.reshape(array.shape[:1] + (1,) * (rank - operand.rank) + array.shape[1:])

    return array_of


def _amplified(pair: tuple, amplification: np.ndarray | None, of_terms: bool = False) -> tuple:
    """The error bound widened by the amplification, norm-wise: rounding in a solve spreads
    over every element of the result. ``of_terms`` scales it by the magnitude of the terms
    (a derivative's bound has its a priori floor) rather than of the result, which may cancel:
    sigmoid's JVP terms at -28 and 59 nearly cancel, and the one at 59 is lost to 1 - y."""
    if amplification is None:
        return pair
    value, error = pair
    with np.errstate(all="ignore"):
        scale = np.maximum(np.abs(value), error) if of_terms else np.abs(value)
        largest = scale.reshape(len(value), -1).max(axis=1) if value.ndim > 1 else scale
        return value, error + per_point(amplification * largest, value)



def restricted(reference: ReferenceSide, keep: np.ndarray) -> ReferenceSide:
    """The reference's pairs at the points where ``keep`` is true."""
    if keep.all():
        return reference

    def kept(pair):
        return None if pair is None else (pair[0][keep], pair[1][keep])

    return ReferenceSide({n: kept(p) for n, p in reference.values.items()},
                         {n: kept(p) for n, p in reference.gradients.items()},
                         [(kept(claimed), kept(derivative)) for claimed, derivative in reference.claimed],
                         kept(reference.jvp), {n: kept(p) for n, p in reference.hvps.items()})




# -- the exact pass --------------------------------------------------------------


@dataclass
class ExactPoint:
    """The reference at one point: a ReferenceSide of float64 midpoints, each beside its
    allowance's bound (in units of u, as the float64 pass's error bounds), and whether a
    comparison lies within a rounding of the inputs of its boundary."""

    side: ReferenceSide
    ambiguous: bool
    bits: int
    # At an exact kink, the derivatives approached from either side (for one_sided), else none.
    one_sided: list = field(default_factory=list)
    # The derivatives with every direction (cotangent, tangent) of magnitude 1, its sign kept:
    # where one of them overflows the dtype, a zero direction times it is undefined there.
    unit: ReferenceSide | None = None
    # The kinds of steps ("value", "backward", "forward") whose exact value overflows the dtype.
    overflowed: frozenset = frozenset()
    # Node label -> how far each exact value may be from its float64 midpoint (``balls.gaps``).
    gaps: dict = field(default_factory=dict)


def exact_point(prepared: Plan, point: Example, model: Precision, order: int, forward: bool,
                one_sided: bool = False) -> ExactPoint | None:
    """The reference at the single point of ``point``, or None where no precision up to the
    last of ``balls.PRECISIONS`` decides its comparisons. Raises ``balls.Beyond`` where a
    result is beyond arb's exponent range. With ``one_sided``, a point exactly
    at a kink also gets the reference with every tie broken one way, and the other.

    The bound beside each value is the allowance's model of code of precision ``model``
    (``verify.tolerance``), as the float64 pass computes it: the radius of the same formulas
    on exact inputs with each step widened as the model rounds it (ball arithmetic encloses
    every such computation), and where the formula has one, its a priori floor. Comparisons
    there are decided by the midpoints, and one that a rounding could flip makes the point
    ambiguous. Where the same formulas with each step rounded by the dtype's own u reach
    farther (a second-order term, at a zero of the first), the bound reaches that far too.
    Where a step overflows the dtype, the model takes its range as unbounded: no step
    underflows either (the exact result is what the code must give there).
    """
    for bits in balls.PRECISIONS:
        try:
            with balls.precision(bits):
                with balls.exactly() as mode:
                    exact, steps = _evaluated(prepared, point, model, order, forward)
                overflowed = "value" in steps  # a step of the spec's forward: its range is then unbounded
                if not balls.settled([array for pair in exact.pairs() for array in pair]):
                    continue
                sides = []
                if one_sided and mode.tied:
                    for ties in (1, -1):
                        with balls.exactly(ties):
                            sides.append(_evaluated(prepared, point, model, order, forward)[0])
                largest = max((float(np.max(np.abs(a), initial=0.0)) for a in point.inputs.values()), default=0.0)
                for unbounded in (overflowed, True):
                    with balls.modelled(model, largest, unbounded=unbounded) as mode:
                        modelled, _ = _evaluated(prepared, point, model, order, forward)
                        per_u = mode.scale / model.u  # a radius here, in units of the dtype's rounding
                        straddled = mode.straddled
                    if unbounded or not mode.overflowed:
                        break
                    overflowed = True  # a step inside a formula overflowed: again, with no step underflowing
                bounded = functools.partial(_with_bounds, prepared, point, model, order, forward, modelled, per_u,
                                            largest, overflowed)
                with balls.exactly():
                    unit = _evaluated(prepared, point.with_unit_directions(), model, order, forward)[0]
                return ExactPoint(bounded(exact), straddled, bits,
                                  one_sided=[bounded(other, ties) for other, ties in zip(sides, (1, -1))],
                                  gaps={label: balls.gaps(value) for label, (value, _) in exact.values.items()},
                                  unit=unit.combined(unit, lambda pair, _: (balls.to_float(pair[0]), 0.0)),
                                  overflowed=frozenset(steps))
        except balls.Undecided:
            continue
    return None


def _with_bounds(prepared: Plan, point: Example, model: Precision, order: int, forward: bool,
                 modelled: ReferenceSide, per_u, largest: float, overflowed: bool, side: ReferenceSide,
                 ties: int = 0) -> ReferenceSide:
    """``side`` (exact balls) as float64 midpoints beside their bounds, in units of u: the
    first-order model's (``modelled``, whose radii times ``per_u`` are in units of u), reaching
    as far as the same formulas rounded by the dtype's own u (``_reach``) do, and what a
    kernel that computes everything returns stored once (``_returned``)."""
    side = side.combined(modelled, functools.partial(_bounded, per_u=per_u))
    try:
        reach = _reach(prepared, point, model, order, forward, largest, overflowed, ties)
    except balls.Undecided:  # a rounding makes a compared value undefined: no bound
        return side.combined(side, lambda pair, _: (pair[0], np.where(np.isnan(pair[0]), 0.0, np.inf)))
    if reach is not None:
        side = side.combined(reach, functools.partial(_reaching, u=model.u))
    side = ReferenceSide(side.values, side.gradients, side.claimed, side.jvp,
                         {name: (value, SECOND_ORDER * bound) for name, (value, bound) in side.hvps.items()})
    if model.fused:
        output = prepared.spec.output
        side = ReferenceSide({name: _returned(pair, model) if name == output else pair
                              for name, pair in side.values.items()},
                             {name: _returned(pair, model) for name, pair in side.gradients.items()},
                             side.claimed, None if side.jvp is None else _returned(side.jvp, model),
                             {name: _returned(pair, model) for name, pair in side.hvps.items()})
    return side


def _reach(prepared: Plan, point: Example, model: Precision, order: int, forward: bool, largest: float,
           overflowed: bool, ties: int) -> ReferenceSide | None:
    """The formulas in balls that round each step by the dtype's own u, higher-order terms
    included, exact ties taken as ``ties`` says; None where such a ball leaves arb's range
    (the first-order model then stands alone). Raises ``balls.Undecided`` where a rounding
    reaches a comparison of an undefined value."""
    try:
        with balls.exactly(ties), balls.modelled(model, largest, linear=False, unbounded=overflowed):
            return _evaluated(prepared, point, model, order, forward)[0]
    except balls.Beyond:
        return None


def _reaching(pair: tuple, rounded: tuple, u: float) -> tuple:
    """(midpoint, bound in units of u), the bound widened to reach every value of the ball
    ``rounded``: the second-order terms of the dtype's rounding. Where that ball is not finite
    (a rounding reaches a singularity: acosh' at 1 + exp(-40), which rounds to 1), neither is
    the bound."""
    value, bound = pair
    with np.errstate(all="ignore"):
        reach = (np.abs(balls.to_float(rounded[0]) - value) + balls.radius(rounded[0], 1)) / u
        return value, np.maximum(bound, np.where(np.isnan(value), 0.0, np.nan_to_num(reach, nan=np.inf)))


def _bounded(pair: tuple, modelled: tuple, per_u) -> tuple:
    """(midpoint, bound in units of u) from an exact (value, magnitude) pair and the same
    pair in the modelled computation; the bound is the larger of the two models, as in the
    float64 pass."""
    value, magnitude = pair
    with np.errstate(all="ignore"):
        value = balls.to_float(value)
        modelled = np.where(np.isnan(value), 0.0, balls.radius(modelled[0], per_u))  # undefined: no bound needed
        magnitude = np.abs(balls.to_float(magnitude))
        # The magnitudes' formula may be undefined where the value is not (a removable 0/0).
        return value, np.maximum(np.where(np.isnan(magnitude), 0.0, magnitude), modelled)


def exact_values(prepared: Plan, point: Example, model: Precision) -> tuple | None:
    """(label -> (float64 midpoint, 0), label -> ``balls.gaps``) of every node's exact value at
    the single point of ``point``, at the first precision that settles them; None where none
    does. Raises ``balls.Beyond`` as ``exact_point`` does. The values alone decide the rules
    that reject a point by its values, for a fraction of ``exact_point``'s work."""
    for bits in balls.PRECISIONS:
        try:
            with balls.precision(bits), balls.exactly():
                ctx = _exact_context(prepared, point, model)
                values = [_enter(ctx, name, reference.exact(ctx), exact=True)[0]
                          for name, reference in prepared.values.items()]
        except balls.Undecided:
            continue
        if balls.settled(values):
            return ({label: (balls.to_float(value), np.zeros(np.shape(value)))
                     for label, value in zip(prepared.values, values)},
                    {label: balls.gaps(value) for label, value in zip(prepared.values, values)})
    return None


def _exact_context(prepared: Plan, point: Example, model: Precision) -> Context:
    """A context of the inputs at ``point`` as balls: exact, as are the directions."""
    def exact(array, convert=balls.to_balls):
        return convert(np.asarray(array, dtype=np.float64)), np.zeros(np.shape(array))

    ctx = Context({name: exact(array, balls.to_integers if prepared.spec.inputs[name].integer else balls.to_balls)
                   for name, array in point.inputs.items()}, point.sizes, point.batch, model)
    if prepared.spec.nodes[prepared.spec.output].shape:
        ctx.env[COTANGENT] = exact(point.cotangent)
    else:
        ctx.backward_scale = float(np.max(np.abs(point.cotangent)))
    for name, tangent in (point.tangents or {}).items():
        ctx.env[tangent_name(name)] = exact(tangent)
    return ctx


def _evaluated(prepared: Plan, point: Example, model: Precision, order: int, forward: bool) -> tuple:
    """(every formula of the plan at ``point`` on balls, the kinds of steps that left ``model``'s
    dtype's range: "value", "backward" (an adjoint), "forward" (a tangent))."""
    ctx = _exact_context(prepared, point, model)

    def evaluated(reference: Reference) -> tuple:
        return reference.exact(ctx)

    values = {name: _enter(ctx, name, evaluated(reference), exact=True) for name, reference in prepared.values.items()}
    with balls.forward_steps_noted(False):
        derivatives = backward(prepared, ctx, evaluated, exact=True)
        jvp = forward_chained(prepared, ctx, evaluated, exact=True) if forward else None
        side = ReferenceSide(values, *reference_derivatives(prepared, point, ctx, values, order, forward,
                                                            bounded=False, exact=True, derivatives=derivatives,
                                                            jvp=jvp))
    largest = float(torch.finfo(model.dtype).max)
    kinds = set(ctx.overflowed_kernels)
    for name, (value, _) in ctx.env.items():
        if name in point.inputs or name == COTANGENT:
            continue
        kind = "backward" if name.startswith(ADJOINT_PREFIX) else "forward" if name.startswith(TANGENT_PREFIX) else "value"
        if kind not in kinds and np.any(np.abs(balls.to_float(np.asarray(value, dtype=object))) > largest):
            kinds.add(kind)
    return side, kinds
