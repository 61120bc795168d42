"""The engine: derive once per spec, then let Hypothesis drive batches of points through both sides.

``plan`` does all the sympy work of a spec once (lowering, differentiation, claim proofs,
compilation to numeric code) and caches it. ``run`` draws examples, evaluates the reference
and torch on each batch, rejects points where the math is undefined or overflows the
dtype, compares values, gradients and claims, and turns the shrunk counterexample into a
``Mismatch``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase

from .errors import Mismatch, Unchecked, Unsupported
from .ir import Apply, Constant, Ref, SizeRef, Spec, concrete_shape, graph_nodes
from .lower.sympy import (
    COTANGENT,
    SympyLowering,
    Tensor,
    _broadcast_index,
    derive,
    directional_derivative,
    prove_equal,
    second_derivative,
    tangent_name,
)
from .ops import COMPARISONS, CONCRETE_ONLY, REGISTRY
from .reference import ERROR_DTYPE, Context, Reference, per_point
from .report import CHECKED, REFUTED, ClaimResult, Failure, Result, proved, reproduction_snippet
from .settings import stable_seed
from .strategies import BATCHED, PER_POINT, Example, examples
from .subject import CodeFailure, FunctionSubject, ModeUnsupported, SpecSubject, function_name
from .tolerance import UNIT_ROUNDOFF, allowed_error, representable_limit, underflow_limit

MODES = ("rev", "fwd")


@dataclass
class ClaimPlan:
    text: str
    line: int
    kind: str  # "grad" or "hessian"
    wrt: str
    claimed: Tensor
    proved: bool
    reference: Reference  # the claimed closed form
    derivative: Reference  # sympy's derivative it is claimed to equal


@dataclass
class Plan:
    """Everything a spec needs at run time; built once, reused for every example and dtype."""

    spec: Spec
    values: dict  # label -> Reference of each node's value
    steps: dict  # label -> Reference of the node's op on its operands' values (see derive)
    gradients: dict  # name -> Reference of ∂o/∂name (against the cotangent, for a non-scalar o)
    claims: list
    subject: SpecSubject
    nodes: dict  # label -> node
    jvp: Reference | None = None  # derived when forward mode is first checked
    hvps: dict | None = None  # input name -> Reference, derived when order 2 is first checked

    def forward_mode(self) -> Reference:
        if self.jvp is None:
            output = self.values[self.spec.output].tensor
            self.jvp = Reference(directional_derivative(output, self.spec), frozenset(self.spec.size_symbols),
                                 a_priori=True)
        return self.jvp

    def second_order(self) -> dict:
        if self.hvps is None:
            self.hvps = {name: Reference(directional_derivative(self.gradients[name].tensor, self.spec),
                                         frozenset(self.spec.size_symbols), a_priori=True)
                         for name in self.spec.inputs if name in self.gradients}
        return self.hvps


# Plans by spec, the least recently used dropped first: a run over thousands of spec files
# keeps only the recent ones.
_PLANS: OrderedDict = OrderedDict()
PLAN_CACHE_SIZE = 64


def plan(spec: Spec, sizes: dict | None = None) -> Plan:
    """The sympy work for ``spec``, done once per spec text and cached.

    Specs with an op that index notation cannot express (``det``, ``inv``) are derived per
    size instead, so they need ``sizes``.
    """
    concrete = needs_concrete_sizes(spec)
    # Specs built in Python have no text of their own: they are cached by identity.
    key = (spec.source or id(spec), spec.path, tuple(sorted(sizes.items())) if concrete else None)
    if key not in _PLANS:
        tracked = labelled_nodes(spec)
        differentiate = [*spec.inputs.values(), *spec.nodes.values()]
        _PLANS[key] = build_plan(spec, tracked, differentiate, sizes if concrete else None)
        if len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return _PLANS[key]


def needs_concrete_sizes(spec: Spec) -> bool:
    return any(isinstance(node, Apply) and node.op in CONCRETE_ONLY for node in graph_nodes(spec))


def labelled_nodes(spec: Spec) -> dict:
    """Node -> label for every node whose value can be compared: inputs, named nodes, and
    unnamed subexpressions (labelled by their text, as in ``sum(y)``). Constants are left out."""
    labels = {node: name for name, node in spec.inputs.items()}
    named = {id(node): name for name, node in spec.nodes.items()}
    taken = set(labels.values()) | set(named.values())
    for node in graph_nodes(spec):
        if node in labels or isinstance(node, (Constant, SizeRef)):
            continue
        if isinstance(node, Apply) and REGISTRY[node.op] in COMPARISONS:
            continue
        label = named.get(id(node))
        if label is None:
            label = node.loc.text
            if any(c in label for c in " +-*/@"):
                label = f"({label})"  # so that sympy prints (W @ x)[i], not W @ x[i]
            while label in taken:
                label += "'"
        taken.add(label)
        labels[node] = label
    return labels


def build_plan(spec: Spec, tracked: dict, differentiate, sizes: dict | None = None) -> Plan:
    """Derive, prove and compile the values of ``tracked`` (node -> name) and the gradients
    with respect to the nodes in ``differentiate``."""
    derivation = derive(spec, tracked, differentiate, sizes)
    size_names = frozenset(spec.size_symbols)
    values = {name: Reference(t, size_names) for name, t in derivation.values.items()}
    # Torch's derivative formulas are equal to sympy's, not the same: their bounds get a floor.
    gradients = {name: Reference(t, size_names, a_priori=True) for name, t in derivation.gradients.items()}
    steps = {name: Reference(t, size_names) for name, t in derivation.steps.items()}
    claims = []
    for claim in spec.claims:
        lowering = SympyLowering(spec, sizes=sizes)
        derivative = derivation.gradients[claim.wrt].inline(derivation.values)
        if claim.kind == "hessian":
            derivative = second_derivative(derivative, spec, claim.wrt, lowering)
            derivative_reference = Reference(derivative, size_names)
        else:
            derivative_reference = gradients[claim.wrt]
        shape = derivative.shape
        claimed_expr = lowering.element(claim.expr, _broadcast_index(derivative.indices, shape, claim.expr.shape))
        claimed = Tensor(claimed_expr, derivative.indices, shape)
        claims.append(ClaimPlan(_claim_text(claim), claim.loc.line, claim.kind, claim.wrt, claimed,
                                prove_equal(derivative, claimed_expr), Reference(claimed, size_names),
                                derivative_reference))
    return Plan(spec, values, steps, gradients, claims, SpecSubject(spec, tracked),
                {v: k for k, v in tracked.items()})


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


def _validated(dtype, order, modes, device) -> Options:
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError("dtype must be one of torch.float64, torch.float32, torch.bfloat16, torch.float16; "
                         f"got {dtype}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}; got {modes!r}")
    return Options(dtype, order, modes, str(torch.device(device)))


class _Counterexample(Exception):
    """Raised inside the Hypothesis test so that Hypothesis shrinks the example."""

    def __init__(self, failure: Failure, drawn: bool = True):
        self.failure = failure
        self.drawn = drawn  # by Hypothesis, not the spec's example point
        super().__init__(failure.subject)


def run(spec: Spec, *, fn=None, max_examples: int = 100, seed: int | None = None, dtype: torch.dtype = torch.float64,
        order: int = 1, modes=MODES, device: str = "cpu", database: str | Path | None = None,
        derandomize: bool = False, sizes: dict | None = None) -> Result:
    """Check ``spec``'s torch lowering, or ``fn``, on Hypothesis-drawn batches of points and
    on the spec's example point.

    With ``database`` (a directory), failing examples are kept there and replayed first by
    the next run of the same spec, function and dtype. ``derandomize`` derives the seed from
    the spec text when none is given. ``sizes`` fixes size symbols (``{"n": 1000}``); the
    others are drawn.
    """
    __tracebackhide__ = True
    options = _validated(dtype, order, modes, device)
    sizes = _validated_sizes(spec, sizes)
    if seed is None:
        seed = stable_seed(spec.source, options.dtype_name) if derandomize else random.SystemRandom().randrange(2**31)
    name = spec.path or "<spec>"
    reproduce = _reproduce_line(spec, fn, seed, options, sizes)
    result = Result(name, options.dtype_name, seed, modes=options.modes, order=options.order, reproduce=reproduce,
                    claims=[ClaimResult(_claim_text(c), c.loc.line, True) for c in spec.claims])
    rejected = Counter()
    if not needs_concrete_sizes(spec):
        plan(spec)  # the sympy work happens here, before any example
    subject = None if fn is None else FunctionSubject(spec, fn, options.device)
    tangents = "fwd" in options.modes or options.order == 2

    kept = None if database is None else DirectoryBasedExampleDatabase(str(database))
    key = _database_key(spec, fn, options, sizes)
    replayable = 0 if kept is None else len(list(kept.fetch(key)))
    calls, first_failing_call = 0, None

    def agrees(example):
        nonlocal calls, first_failing_call
        calls += 1
        if "dtype" in result.unsupported:
            return
        failure = evaluate(spec, subject, example, options, result, rejected)
        if failure is not None:
            first_failing_call = first_failing_call or calls
            raise _Counterexample(failure)

    budget = BATCHED if subject is None else PER_POINT
    test = given(examples(spec, options.dtype, sizes=sizes, tangents=tangents, budget=budget))(agrees)
    # Hypothesis keys kept examples by the test function's source, the same for every spec.
    test._hypothesis_internal_database_key = key
    # No explain phase: it reruns a failing example many times over to annotate Hypothesis's
    # own report, which verify replaces with its own.
    test = settings(max_examples=max_examples, database=kept, deadline=None, report_multiple_bugs=False,
                    verbosity=Verbosity.quiet, phases=[p for p in Phase if p is not Phase.explain],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(hypothesis_seed(seed)(test))
    try:
        test()
        point = example_point(spec, options.dtype, tangents)
        if point is not None and sizes.items() <= point.sizes.items() and "dtype" not in result.unsupported:
            failure = evaluate(spec, subject, point, options, result, rejected)
            if failure is not None:
                failure.notes.append("at the example point given in the spec")
                raise _Counterexample(failure, drawn=False)
    except _Counterexample as found:
        # The example point is kept as the spec gives it; a drawn one is made simpler.
        failure = _simplified(spec, subject, found.failure, options) if found.drawn else found.failure
        for claim in result.claims:
            if failure.claim == claim.text:
                claim.status = REFUTED
        if first_failing_call is not None and first_failing_call <= replayable:
            failure.notes.append(f"found first by replaying an example kept in {database}")
        result.rejected = dict(rejected)
        raise Mismatch(failure.render(name, reproduce), failure, result) from None
    result.rejected = dict(rejected)
    if result.unsupported:
        reasons = "; ".join(f"{mode}: {reason}" for mode, reason in result.unsupported.items())
        hint = ' (pass modes=("rev",) to check reverse mode only)' if "fwd" in result.unsupported else ""
        raise Unsupported(f"{name}: not everything asked for could be checked: {reasons}{hint}", result)
    if result.points == 0:
        reasons = "; ".join(f"{count} {reason}" for reason, count in rejected.most_common(3)) or "none drawn"
        raise Unchecked(f"{name}: no point could be checked: every point was rejected ({reasons})", result)
    for claim in result.claims:
        symbols = [] if needs_concrete_sizes(spec) else spec.size_symbols
        claim.status = (proved(symbols) + (" at every size checked" if symbols != spec.size_symbols else "")
                        if claim.proved else CHECKED)
    return result


def _validated_sizes(spec: Spec, sizes: dict | None) -> dict:
    sizes = dict(sizes or {})
    for name, value in sizes.items():
        if name not in spec.size_symbols:
            known = ", ".join(spec.size_symbols) or "none"
            raise ValueError(f"sizes: {name!r} is not a size symbol of the spec (its size symbols: {known})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sizes: {name} must be a positive int; got {value!r}")
    return sizes


def _database_key(spec: Spec, fn, options: Options, sizes: dict) -> bytes:
    """What a kept example belongs to: the spec text, the function checked, the dtype and the
    fixed sizes."""
    subject = "" if fn is None else function_name(fn)
    return hashlib.sha256(f"{spec.source}\0{subject}\0{options.dtype_name}\0{sorted(sizes.items())}".encode()).digest()


def _reproduce_line(spec: Spec, fn, seed: int, options: Options, sizes: dict) -> str:
    extras = [] if options.dtype == torch.float64 else [f"dtype=torch.{options.dtype_name}"]
    if sizes:
        extras.append(f"sizes={sizes!r}")
    if options.order != 1:
        extras.append(f"order={options.order}")
    if options.modes != MODES:
        extras.append(f"modes={options.modes!r}")
    if fn is not None:
        return f"verify.check_function({function_name(fn)}, spec, seed={seed}" + "".join(
            f", {e}" for e in extras) + ")"
    if spec.path:
        flags = "" if options.dtype == torch.float64 else f" --dtype {options.dtype_name}"
        flags += "" if options.order == 1 else f" --order {options.order}"
        flags += "" if options.modes == MODES else f" --modes {','.join(options.modes)}"
        flags += "" if not sizes else " --sizes " + ",".join(f"{k}={v}" for k, v in sizes.items())
        return f"verify check {spec.path} --seed {seed}{flags}"
    return f"verify.check(spec, seed={seed}" + "".join(f", {e}" for e in extras) + ")"


def _claim_text(claim) -> str:
    return claim.loc.text.removeprefix("assert").strip()


def example_point(spec: Spec, dtype: torch.dtype, tangents: bool = False) -> Example | None:
    """The spec's example point as a batch of one, rounded to ``dtype`` as torch will see it,
    with cotangent and tangents of ones."""
    point = spec.example_point()
    if point is None:
        return None
    sizes = {}
    for name, declared in spec.inputs.items():
        nested = point[name]
        for dim in declared.shape:
            if not isinstance(dim, int):
                sizes[dim.name] = len(nested)
            nested = nested[0]
    inputs = {name: torch.tensor([value], dtype=dtype).double().numpy() for name, value in point.items()}
    return Example(sizes, inputs, *unit_directions(spec, sizes, inputs, tangents))


def unit_directions(spec: Spec, sizes: dict, inputs: dict, tangents: bool) -> tuple:
    """A cotangent of ones and (when asked) tangents of ones, for a batch of one point."""
    cotangent = np.ones((1, *concrete_shape(spec.nodes[spec.output].shape, sizes)))
    return cotangent, ({name: np.ones_like(array) for name, array in inputs.items()} if tangents else None)


@dataclass
class ReferenceSide:
    """The reference on a batch; each entry is a (value, error bound) pair, or with
    ``bounded=False`` a (value, floor of the error bound) pair."""

    values: dict  # label -> pair
    gradients: dict  # name -> the VJP with the example's cotangent
    claimed: list  # per claim: (claimed form, sympy's derivative)
    jvp: tuple | None
    hvps: dict
    inside: np.ndarray  # points where every op is inside its domain
    outside: Counter  # the domains the other points are outside of -> number of points
    ambiguous: np.ndarray  # points where a comparison is too close to call in the dtype


def reference_side(prepared: Plan, example: Example, dtype: torch.dtype, order: int = 1,
                   forward: bool = False) -> ReferenceSide:
    """The reference at every point of ``example``: values, VJPs, claims, and (as asked) the
    JVP and Hessian-vector products."""
    ctx, values, inside, outside = reference_values(prepared, example, dtype)
    return ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, order, forward),
                         inside, outside, ctx.ambiguous)


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

    def at(self, keep: np.ndarray) -> TorchSide:
        if keep.all():
            return self
        def kept(entry):
            if isinstance(entry, dict):
                return {name: kept(array) for name, array in entry.items()}
            return entry[keep] if isinstance(entry, np.ndarray) else entry

        return TorchSide(kept(self.values), kept(self.gradients), kept(self.jvp), kept(self.hvps))


def _torch_side(prepared: Plan, subject, at: Example, options: Options, result: Result):
    """Everything torch computes on ``at`` for the checks asked; a Failure when its first call
    raised, or None when the dtype is unsupported."""
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
    """One check of a batch: a reference (value, error bound) against an array of the same shape."""

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


def evaluate(spec: Spec, subject, example: Example, options: Options, result: Result, rejected: Counter):
    """Compare both sides on one batch; returns the first Failure, or None when all agree.

    ``subject`` is a FunctionSubject, or None for the spec's own torch lowering.

    The reference is first evaluated without its error bounds. Points where torch agrees
    with it within the tolerance of a floor of those bounds (tighter than the bounds allow)
    are checked at that; only the others pay for the error arithmetic, and only there are
    points rejected as too close to a kink or with a step that overflows.
    """
    prepared = plan(spec, example.sizes)
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
    at = example.at(keep)
    actual = _torch_side(prepared, subject, at, options, result)
    if not isinstance(actual, TorchSide):
        return actual
    estimate = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order,
                                                            forward, bounded=False), inside, outside, ctx.ambiguous)
    confirmed = np.ones(at.batch, dtype=bool)
    for comparison in _comparisons(prepared, subject, _restricted(estimate, keep), actual, dtype):
        if isinstance(comparison, Failure):
            confirmed[:] = False
            break
        confirmed &= _agreeing(*comparison.reference, comparison.actual, comparison.dtype)
    result.points += int(confirmed.sum())
    if confirmed.all():
        return None
    return _checked_closely(prepared, subject, at.at(~confirmed), actual.at(~confirmed), options, result, rejected)


def _checked_closely(prepared: Plan, subject, example: Example, actual: TorchSide, options: Options, result: Result,
                     rejected: Counter):
    """The checks of ``evaluate`` with the reference's error bounds, where torch was not
    within the floor's tolerance; the first Failure, or None."""
    dtype = options.dtype
    forward = actual.jvp is not None
    ctx, values, inside, outside = reference_values(prepared, example, dtype)
    rejected.update(outside)
    keep = _unambiguous(inside, ctx.ambiguous, rejected)
    keep = _accepted_points(example.batch, dtype, rejected, keep,
                            [(f"the value of {n}", value) for n, value in values.items()])
    if not keep.any():  # the derivatives would be rejected too: a batch of overflows costs little
        return None
    reference = ReferenceSide(values, *reference_derivatives(prepared, example, ctx, values, options.order, forward),
                              inside, outside, ctx.ambiguous)
    output = prepared.spec.output
    keep = _accepted_points(example.batch, dtype, rejected, _unambiguous(keep, ctx.ambiguous, rejected), [
        *((f"∂{output}/∂{n}", value) for n, value in reference.gradients.items()),
        *((f"the claimed {c.kind} of {c.wrt}", value) for c, (value, _) in zip(prepared.claims, reference.claimed)),
        *((("the JVP of " + output, reference.jvp),) if reference.jvp is not None else ()),
        *((f"the Hessian-vector product of {n}", value) for n, value in reference.hvps.items()),
    ])
    if not keep.any():
        return None
    at = example.at(keep)
    for comparison in _comparisons(prepared, subject, _restricted(reference, keep), actual.at(keep), dtype):
        if isinstance(comparison, Failure):
            return comparison
        found = _compare(*comparison.reference, comparison.actual, comparison.dtype)
        if found is not None:
            return _failure(prepared.spec, subject, comparison, at, *found, options)
    result.points += int(keep.sum())
    return None


def _restricted(reference: ReferenceSide, keep: np.ndarray) -> ReferenceSide:
    """The reference's pairs at the points where ``keep`` is true."""
    if keep.all():
        return reference
    def kept(pair):
        return None if pair is None else (pair[0][keep], pair[1][keep])

    return ReferenceSide({n: kept(p) for n, p in reference.values.items()},
                         {n: kept(p) for n, p in reference.gradients.items()},
                         [(kept(claimed), kept(derivative)) for claimed, derivative in reference.claimed],
                         kept(reference.jvp), {n: kept(p) for n, p in reference.hvps.items()},
                         reference.inside[keep], reference.outside, reference.ambiguous[keep])


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


# Values a failing point's elements are tried at, simplest first, when Hypothesis could not
# shrink the point itself (it came from a materialized bulk of points).
SIMPLER_VALUES = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 10.0, -10.0)
SIMPLIFIED_ELEMENTS = 64
SIMPLIFY_SECONDS = 2.0


def _simplified(spec: Spec, subject, failure: Failure, options: Options) -> Failure:
    """The failure at a point whose elements are each as simple as still shows it: tried at
    SIMPLER_VALUES, at the value rounded to fewer digits, and directions at 1."""
    point = failure.point
    if point is None:
        return failure
    arrays = {**point.inputs, "cotangent": point.cotangent,
              **{f"tangent of {name}": t for name, t in (point.tangents or {}).items()}}
    if sum(a.size for a in arrays.values()) > SIMPLIFIED_ELEMENTS:
        return failure
    deadline = time.monotonic() + SIMPLIFY_SECONDS
    scratch = Result(failure.subject, options.dtype_name, 0)

    def still_fails(candidate: Example) -> Failure | None:
        found = evaluate(spec, subject, candidate, options, scratch, Counter())
        return found if found is not None and (found.check, found.subject) == (failure.check, failure.subject) else None

    for name, array in arrays.items():
        for element in np.ndindex(array.shape):
            current = float(array[element])
            direction = name == "cotangent" or name.startswith("tangent of ")
            for candidate in ((1.0,) if direction else _simpler(current, options.dtype)):
                if candidate == current or time.monotonic() > deadline:
                    break  # candidates come simplest first: none after the current value is simpler
                trial = {k: a.copy() for k, a in arrays.items()}
                trial[name][element] = candidate
                example = Example(point.sizes, {n: trial[n] for n in point.inputs}, trial["cotangent"],
                                  {n: trial[f"tangent of {n}"] for n in point.tangents} if point.tangents else None)
                found = still_fails(example)
                if found is not None:
                    arrays, failure = trial, found
                    break
    return failure


def _simpler(value: float, dtype: torch.dtype) -> list:
    rounded = [float(f"{value:.{digits}g}") for digits in (1, 2, 3)]
    return [float(torch.tensor(c, dtype=dtype)) for c in (*SIMPLER_VALUES, float(round(value)), *rounded)]


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
    no subnormal number, and (``bounded``: the bounds are computed) has a finite error bound.

    The others are counted by reason and left out: there the math is undefined, or the
    result overflows or underflows the dtype, or a step on the way does (a NaN from inf - inf
    on the way counts as that step's overflow).
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
            else:
                lost = np.zeros((batch, 1), dtype=bool)
                defined = ~np.isnan(value).any(axis=1)
                fits = ~(magnitude + allowed_error(magnitude, 0.0, dtype) > limit).any(axis=1)
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
        allowed = allowed_error(reference, floor, dtype)
        ok = (np.abs(actual - reference) <= allowed) & (np.abs(reference) + allowed <= representable_limit(dtype))
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
