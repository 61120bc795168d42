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
from .lower.sympy import COTANGENT, adjoint_name, tangent_name
from .ops import REGISTRY
from .reference import ERROR_DTYPE, Context, Reference, per_point
from .strategies import Example
from .tolerance import UNIT_ROUNDOFF

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
    # A scalar output's gradients before the cotangent scales them, where the exact pass
    # judges whether the dtype can hold them.
    jacobian: dict = field(default_factory=dict)

    def pairs(self) -> list:
        return [*self.values.values(), *self.gradients.values(), *(p for both in self.claimed for p in both),
                *([self.jvp] if self.jvp is not None else []), *self.hvps.values(), *self.jacobian.values()]

    def combined(self, other: ReferenceSide, combine) -> ReferenceSide:
        """A side whose every pair is ``combine(this side's pair, the other's)``."""
        def each(mine: dict, theirs: dict) -> dict:
            return {name: combine(pair, theirs[name]) for name, pair in mine.items()}

        return ReferenceSide(each(self.values, other.values), each(self.gradients, other.gradients),
                             [(combine(a, c), combine(b, d)) for (a, b), (c, d) in zip(self.claimed, other.claimed)],
                             None if self.jvp is None else combine(self.jvp, other.jvp),
                             each(self.hvps, other.hvps), each(self.jacobian, other.jacobian))


def reference_side(prepared: Plan, example: Example, dtype: torch.dtype, order: int = 1,
                   forward: bool = False) -> ReferenceSide:
    """The reference at every point of ``example``: values, VJPs, claims, and (as asked) the
    JVP and Hessian-vector products."""
    ctx, values = reference_values(prepared, example, dtype)
    return ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, order, forward))


def reference_values(prepared: Plan, example: Example, dtype: torch.dtype, bounded: bool = True) -> tuple:
    """(context, node label -> (value, error bound)) at every point of ``example``. Without
    ``bounded``, the error bounds are only floors, and cost no error arithmetic."""
    # Inputs carry one rounding each in the error bounds, though they are exact: an algorithm
    # is right when its result is the exact one for inputs perturbed by a rounding (backward
    # stability), so the bounds include the condition number of each formula at the point.
    # Integers (indices, labels) are exact: no rounding moves an index.
    ctx = Context({name: (array, np.zeros(array.shape) if prepared.spec.inputs[name].integer
                          else np.abs(array).astype(ERROR_DTYPE)) for name, array in example.inputs.items()},
                  example.sizes, example.batch, dtype)
    exact = np.zeros((), dtype=ERROR_DTYPE)
    if prepared.spec.nodes[prepared.spec.output].shape:
        ctx.env[COTANGENT] = (example.cotangent, np.broadcast_to(exact, example.cotangent.shape))
    for name, tangent in (example.tangents or {}).items():
        ctx.env[tangent_name(name)] = (tangent, np.broadcast_to(exact, tangent.shape))
    values = {}
    for name, reference in prepared.values.items():  # in graph order, so the operands' entries are ready
        values[name] = _enter(ctx, name, reference(ctx) if bounded else reference.estimate(ctx), exact=False)
    if bounded:
        # An op's kernel model (a solve's norm-wise error) widens only what depends on that op.
        amplifications = _amplifications(prepared, example, values, dtype, "forward_condition")
        values = {name: _amplified(pair, _local(amplifications, prepared.upstream[name]))
                  for name, pair in values.items()}
    return ctx, values


def reference_derivatives(prepared: Plan, example: Example, ctx: Context, values: dict, order: int,
                          forward: bool, bounded: bool = True, exact: bool = False,
                          derivatives: dict | None = None, jvp: tuple | None = None) -> tuple:
    """(VJPs, claims, JVP, Hessian-vector products) in the context of ``reference_values``,
    or with ``exact`` of the exact pass (balls); ``derivatives`` (name -> pair) and ``jvp``,
    where given, are the gradients before any cotangent and the JVP."""
    amplifications = _amplifications(prepared, example, values, ctx.dtype, "backward_condition") if bounded else {}

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
    if exact and seed is not None:
        seed = balls.to_balls(np.asarray(seed, dtype=np.float64))
    gradients = {name: widened(_times(pair, seed), name) for name, pair in derivatives.items()}
    claimed = [(evaluated(claim.reference), derivatives[claim.wrt] if claim.kind == "grad" else evaluated(claim.derivative))
               for claim in prepared.claims]
    if forward:
        jvp = widened(forward_chained(prepared, ctx, evaluated, exact) if jvp is None else jvp)
    hvps = ({name: widened(_times(evaluated(reference), seed)) for name, reference in prepared.second_order().items()}
            if order == 2 else {})
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
    bound, and torch holds every step in the dtype: where one underflows, the model widens it
    by the smallest normal number."""
    if exact:
        pair = balls.underflowed(pair[0]), pair[1]
        ctx.env[name] = pair[0], np.zeros(np.shape(pair[0]))
    else:
        ctx.env[name] = pair
    return pair


def _times(pair: tuple, seed) -> tuple:
    """(value, error) times a per-point scalar, with one more rounding."""
    if seed is None:
        return pair
    value, error = pair
    factor = seed.reshape((len(seed),) + (1,) * (value.ndim - 1))
    with np.errstate(all="ignore"):  # inf bounds stay inf; the point is rejected later
        product = value * factor
        return product, error * np.abs(factor) + np.abs(product)


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
    # Node label -> how far each exact value may be from its float64 midpoint (``balls.gaps``).
    gaps: dict = field(default_factory=dict)


def exact_point(prepared: Plan, point: Example, dtype: torch.dtype, order: int, forward: bool,
                one_sided: bool = False) -> ExactPoint | None:
    """The reference at the single point of ``point``, or None where no precision up to the
    last of ``balls.PRECISIONS`` decides its comparisons. Raises ``balls.Beyond`` where a
    result is beyond arb's exponent range. With ``one_sided``, a point exactly
    at a kink also gets the reference with every tie broken one way, and the other.

    The bound beside each value has two parts. The formula over the magnitudes of its terms
    bounds what rounding each term may cost. The radius of the same formula on inputs
    widened by one rounding of the dtype (ball arithmetic encloses every such perturbation)
    bounds what a backward-stable computation may be off by: the condition of the formula
    at the point, as the float64 pass's bounds carry it. Comparisons there are decided by
    the midpoints, and one that a rounding of the inputs could flip makes the point ambiguous.
    Where the same formulas with each step rounded by the dtype's u reach farther (a
    second-order term, at a zero of the first), the bound reaches that far too.
    """
    u = UNIT_ROUNDOFF[dtype]
    for bits in balls.PRECISIONS:
        try:
            with balls.precision(bits):
                with balls.exactly() as mode:
                    exact = _evaluated(prepared, point, dtype, order, forward, balls.to_balls)
                if not balls.settled([array for pair in exact.pairs() for array in pair]):
                    continue
                sides = []
                if one_sided and mode.tied:
                    for ties in (1, -1):
                        with balls.exactly(ties):
                            sides.append(_evaluated(prepared, point, dtype, order, forward, balls.to_balls))
                largest = max((float(np.max(np.abs(a), initial=0.0)) for a in point.inputs.values()), default=0.0)
                tiny = float(torch.finfo(dtype).tiny)
                with balls.modelled(u, tiny, largest) as mode:
                    modelled = _evaluated(prepared, point, dtype, order, forward, balls.widened)
                    per_u = mode.scale / u  # a radius here, in units of the dtype's rounding
                    straddled = mode.straddled
                bounded = functools.partial(_with_bounds, prepared, point, dtype, order, forward, modelled, per_u,
                                            largest)
                return ExactPoint(bounded(exact), straddled, bits,
                                  [bounded(other, ties) for other, ties in zip(sides, (1, -1))],
                                  {label: balls.gaps(value) for label, (value, _) in exact.values.items()})
        except balls.Undecided:
            continue
    return None


def _with_bounds(prepared: Plan, point: Example, dtype: torch.dtype, order: int, forward: bool,
                 modelled: ReferenceSide, per_u, largest: float, side: ReferenceSide, ties: int = 0) -> ReferenceSide:
    """``side`` (exact balls) as float64 midpoints beside their bounds, in units of u: the
    first-order model's (``modelled``, whose radii times ``per_u`` are in units of u), reaching
    as far as the same formulas rounded by the dtype's own u (``_reach``) do."""
    side = side.combined(modelled, functools.partial(_bounded, per_u=per_u))
    try:
        reach = _reach(prepared, point, dtype, order, forward, float(torch.finfo(dtype).tiny), largest, ties)
    except balls.Undecided:  # a rounding makes a compared value undefined: no bound
        return side.combined(side, lambda pair, _: (pair[0], np.where(np.isnan(pair[0]), 0.0, np.inf)))
    return side if reach is None else side.combined(reach, functools.partial(_reaching, u=UNIT_ROUNDOFF[dtype]))


def _reach(prepared: Plan, point: Example, dtype: torch.dtype, order: int, forward: bool, tiny: float,
           largest: float, ties: int) -> ReferenceSide | None:
    """The formulas in balls that round each step by the dtype's own u, higher-order terms
    included, exact ties taken as ``ties`` says; None where such a ball leaves arb's range
    (the first-order model then stands alone). Raises ``balls.Undecided`` where a rounding
    reaches a comparison of an undefined value."""
    try:
        with balls.exactly(ties), balls.modelled(UNIT_ROUNDOFF[dtype], tiny, largest, linear=False):
            return _evaluated(prepared, point, dtype, order, forward, balls.widened)
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


def exact_values(prepared: Plan, point: Example, dtype: torch.dtype) -> tuple | None:
    """(label -> (float64 midpoint, 0), label -> ``balls.gaps``) of every node's exact value at
    the single point of ``point``, at the first precision that settles them; None where none
    does. Raises ``balls.Beyond`` as ``exact_point`` does. The values alone decide the rules
    that reject a point by its values, for a fraction of ``exact_point``'s work."""
    for bits in balls.PRECISIONS:
        try:
            with balls.precision(bits), balls.exactly():
                ctx = _exact_context(prepared, point, dtype, balls.to_balls)
                values = [_enter(ctx, name, reference.exact(ctx), exact=True)[0]
                          for name, reference in prepared.values.items()]
        except balls.Undecided:
            continue
        if balls.settled(values):
            return ({label: (balls.to_float(value), np.zeros(np.shape(value)))
                     for label, value in zip(prepared.values, values)},
                    {label: balls.gaps(value) for label, value in zip(prepared.values, values)})
    return None


def _exact_context(prepared: Plan, point: Example, dtype: torch.dtype, as_balls) -> Context:
    """A context of the inputs at ``point`` made balls by ``as_balls`` (the directions are exact)."""
    def exact(array, convert=balls.to_balls):
        return convert(np.asarray(array, dtype=np.float64)), np.zeros(np.shape(array))

    ctx = Context({name: exact(array, balls.to_integers if prepared.spec.inputs[name].integer else as_balls)
                   for name, array in point.inputs.items()}, point.sizes, point.batch, dtype)
    if prepared.spec.nodes[prepared.spec.output].shape:
        ctx.env[COTANGENT] = exact(point.cotangent)
    for name, tangent in (point.tangents or {}).items():
        ctx.env[tangent_name(name)] = exact(tangent)
    return ctx


def _evaluated(prepared: Plan, point: Example, dtype: torch.dtype, order: int, forward: bool, as_balls) -> ReferenceSide:
    """Every formula of the plan at ``point`` on balls, its inputs made balls by ``as_balls``
    (the directions are exact)."""
    ctx = _exact_context(prepared, point, dtype, as_balls)
    scalar = not prepared.spec.nodes[prepared.spec.output].shape

    def evaluated(reference: Reference) -> tuple:
        return reference.exact(ctx)

    values = {name: _enter(ctx, name, evaluated(reference), exact=True) for name, reference in prepared.values.items()}
    derivatives = backward(prepared, ctx, evaluated, exact=True)
    jvp = forward_chained(prepared, ctx, evaluated, exact=True) if forward else None
    side = ReferenceSide(values, *reference_derivatives(prepared, point, ctx, values, order, forward, bounded=False,
                                                        exact=True, derivatives=derivatives, jvp=jvp))
    if scalar:  # the gradient before the cotangent scales it: torch's backward computes it
        side.jacobian = derivatives
    return side
