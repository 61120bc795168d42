"""The engine: derive once per spec, then let Hypothesis drive batches of points through both sides.

``plan`` does all the sympy work of a spec once (lowering, differentiation, claim proofs,
compilation to numeric code) and caches it. ``run`` draws examples, evaluates the reference
and torch on each batch, rejects points where the math is undefined or overflows the
dtype, compares values, gradients and claims, and turns the shrunk counterexample into a
``Mismatch``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from .errors import Mismatch, Unchecked
from .ir import Apply, Constant, Ref, SizeRef, Spec, concrete_shape, graph_nodes
from .lower.sympy import COTANGENT, SympyLowering, Tensor, _broadcast_index, derive, prove_equal
from .lower.torch import TorchProgram
from .ops import COMPARISONS, CONCRETE_ONLY, REGISTRY
from .reference import ERROR_DTYPE, Context, Reference
from .report import CHECKED, REFUTED, ClaimResult, Failure, Result, proved
from .strategies import Example, examples
from .tolerance import UNIT_ROUNDOFF, allowed_error, representable_limit, underflow_limit


@dataclass
class ClaimPlan:
    text: str
    line: int
    wrt: str
    claimed: Tensor
    proved: bool
    reference: Reference


@dataclass
class Plan:
    """Everything a spec needs at run time; built once, reused for every example and dtype."""

    spec: Spec
    values: dict  # label -> Reference of each node's value
    steps: dict  # label -> Reference of the node's op on its operands' values (see derive)
    gradients: dict  # name -> Reference of ∂o/∂name
    claims: list
    program: TorchProgram
    nodes: dict  # label -> node


_PLANS: dict = {}


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
    gradients = {name: Reference(t, size_names) for name, t in derivation.gradients.items()}
    steps = {name: Reference(t, size_names) for name, t in derivation.steps.items()}
    claims = []
    for claim in spec.claims:
        derivative = derivation.gradients[claim.wrt].inline(derivation.values)
        lowering = SympyLowering(spec, sizes=sizes)
        wrt_shape = lowering.shape(spec.variable(claim.wrt))
        claimed_expr = lowering.element(claim.expr, _broadcast_index(derivative.indices, wrt_shape, claim.expr.shape))
        claimed = Tensor(claimed_expr, derivative.indices, wrt_shape)
        claims.append(ClaimPlan(_claim_text(claim), claim.loc.line, claim.wrt, claimed,
                                prove_equal(derivative, claimed_expr), Reference(claimed, size_names)))
    return Plan(spec, values, steps, gradients, claims, TorchProgram(spec, tracked), {v: k for k, v in tracked.items()})


class _Counterexample(Exception):
    """Raised inside the Hypothesis test so that Hypothesis shrinks the example."""

    def __init__(self, failure: Failure):
        self.failure = failure
        super().__init__(failure.subject)


def run(spec: Spec, *, max_examples: int = 100, seed: int | None = None,
        dtype: torch.dtype = torch.float64) -> Result:
    """Check ``spec`` on Hypothesis-drawn batches of points and on its example point."""
    __tracebackhide__ = True
    if dtype not in UNIT_ROUNDOFF or dtype == torch.bfloat16:
        raise ValueError(f"dtype must be one of torch.float64, torch.float32, torch.float16; got {dtype}")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    name = spec.path or "<spec>"
    result = Result(name, str(dtype).replace("torch.", ""), seed,
                    claims=[ClaimResult(_claim_text(c), c.loc.line, True) for c in spec.claims])
    rejected = Counter()
    if not needs_concrete_sizes(spec):
        plan(spec)  # the sympy work happens here, before any example

    @settings(max_examples=max_examples, database=None, deadline=None, report_multiple_bugs=False,
              verbosity=Verbosity.quiet, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @hypothesis_seed(seed)
    @given(examples(spec, dtype))
    def agrees(example):
        failure = evaluate(spec, example, dtype, result, rejected)
        if failure is not None:
            raise _Counterexample(failure)

    if spec.path:
        reproduce = f"verify check {spec.path} --seed {seed}" + (
            f" --dtype {result.dtype}" if dtype != torch.float64 else "")
    else:
        reproduce = f"verify.check(spec, seed={seed}" + (f", dtype={dtype})" if dtype != torch.float64 else ")")
    try:
        agrees()
        point = example_point(spec, dtype)
        if point is not None:
            failure = evaluate(spec, point, dtype, result, rejected)
            if failure is not None:
                failure.notes.append("at the example point given in the spec")
                raise _Counterexample(failure)
    except _Counterexample as found:
        for claim in result.claims:
            if found.failure.claim == claim.text:
                claim.status = REFUTED
        raise Mismatch(found.failure.render(name, reproduce), found.failure) from None
    result.rejected = dict(rejected)
    if result.points == 0:
        reasons = "; ".join(f"{count} {reason}" for reason, count in rejected.most_common(3)) or "none drawn"
        raise Unchecked(f"{name}: no point could be checked: every point was rejected ({reasons})", result)
    for claim in result.claims:
        if result.points:
            symbols = [] if needs_concrete_sizes(spec) else spec.size_symbols
            claim.status = (proved(symbols) + (" at every size checked" if symbols != spec.size_symbols else "")
                            if claim.proved else CHECKED)
    return result


def _claim_text(claim) -> str:
    return claim.loc.text.removeprefix("assert").strip()


def example_point(spec: Spec, dtype: torch.dtype) -> Example | None:
    """The spec's example point as a batch of one, rounded to ``dtype`` as torch will see it."""
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
    output_shape = spec.nodes[spec.output].shape
    cotangent = np.ones((1, *concrete_shape(output_shape, sizes))) if output_shape else None
    return Example(sizes, inputs, cotangent)


def reference_side(prepared: Plan, example: Example, dtype: torch.dtype) -> tuple:
    """The reference on a batch: (values, gradients, claimed, ambiguous points).

    Values, gradients and claims are (value, error bound) pairs; ``ambiguous`` marks points
    where a comparison is too close to call in ``dtype``.
    """
    # Inputs carry one rounding each in the error bounds, though they are exact: an algorithm
    # is right when its result is the exact one for inputs perturbed by a rounding (backward
    # stability), so the bounds include the condition number of each formula at the point.
    ctx = Context({name: (array, np.abs(array).astype(ERROR_DTYPE)) for name, array in example.inputs.items()},
                  example.sizes, example.batch, dtype)
    exact = np.zeros((), dtype=ERROR_DTYPE)
    if example.cotangent is not None:
        ctx.env[COTANGENT] = (example.cotangent, np.broadcast_to(exact, example.cotangent.shape))
    values = {}
    for name, reference in prepared.values.items():
        value, error = reference(ctx)
        if name in prepared.steps:  # in graph order, so the operands' entries are ready
            error = np.maximum(error, prepared.steps[name](ctx)[1])
        values[name] = ctx.env[name] = value, error  # gradient formulas refer to node values
    ctx.hopeless = ~_inside_domains(prepared, example, values, Counter())
    amplification = _backward_amplification(prepared, example, values, dtype)
    values = {name: _amplified(pair, amplification) for name, pair in values.items()}
    gradients = {name: _amplified(reference(ctx), amplification) for name, reference in prepared.gradients.items()}
    claimed = [claim.reference(ctx) for claim in prepared.claims]
    return values, gradients, claimed, ctx.ambiguous, ctx.rescued


def _backward_amplification(prepared: Plan, example: Example, values: dict, dtype: torch.dtype) -> np.ndarray:
    """Per point, the largest amplification of rounding by the way torch computes an op
    (the registry's ``backward_condition``), capped at 1/u of float64."""
    cap = 1 / UNIT_ROUNDOFF[torch.float64]
    worst = np.zeros(example.batch, dtype=ERROR_DTYPE)
    array_of = _node_arrays(prepared, example, values)
    for label, node in prepared.nodes.items():
        condition = REGISTRY[node.op].backward_condition if isinstance(node, Apply) else None
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


def _amplified(pair: tuple, amplification: np.ndarray) -> tuple:
    """The error bound widened by the amplification, norm-wise: rounding in a solve spreads
    over every element of the result."""
    value, error = pair
    with np.errstate(all="ignore"):
        largest = np.abs(value).reshape(len(value), -1).max(axis=1) if value.ndim > 1 else np.abs(value)
        return value, error + _per_point(amplification * largest, value)


def _per_point(per_point: np.ndarray, like: np.ndarray) -> np.ndarray:
    return per_point.reshape((len(per_point),) + (1,) * (like.ndim - 1))


def evaluate(spec: Spec, example: Example, dtype: torch.dtype, result: Result, rejected: Counter):
    """Compare both sides on one batch; returns the first Failure, or None when all agree."""
    prepared = plan(spec, example.sizes)
    for claim, status in zip(prepared.claims, result.claims):
        status.proved = status.proved and claim.proved
    reference_values, reference_gradients, claimed, ambiguous, rescued = reference_side(prepared, example, dtype)
    keep = _inside_domains(prepared, example, reference_values, rejected)
    newly = keep & ambiguous
    if newly.any():
        rejected["a comparison, kink or tie is within rounding of its boundary"] += int(newly.sum())
    keep = _accepted_points(example.batch, dtype, rejected, keep & ~ambiguous, [
        *((f"the value of {n}", value) for n, value in reference_values.items()),
        *((f"∂{spec.output}/∂{n}", value) for n, value in reference_gradients.items()),
        *((f"the claimed grad of {c.wrt}", value) for c, value in zip(prepared.claims, claimed)),
    ])
    result.examples += 1
    if not keep.any():
        return None
    actual_values, actual_gradients, _ = autograd_side(prepared, example, keep, dtype)
    overflowed = _torch_overflowed(actual_values, actual_gradients) & rescued[keep]
    if overflowed.any():
        # float64 itself overflowed on the way to these finite values, and so did torch.
        rejected[f"torch overflows {str(dtype)[6:]} on the way to a finite result"] += int(overflowed.sum())
        keep[np.flatnonzero(keep)[overflowed]] = False
        if not keep.any():
            return None
        actual_values, actual_gradients, _ = autograd_side(prepared, example, keep, dtype)

    def inputs_at(point):
        shown = {name: array[keep][point] for name, array in example.inputs.items()}
        if example.cotangent is not None:
            shown["cotangent"] = example.cotangent[keep][point]  # the gradient seeded into backward
        return shown

    for name, (reference, error) in reference_values.items():
        failure = _compare(reference[keep], error[keep], actual_values[name], dtype)
        if failure is not None:
            point, allowed = failure
            tensor = prepared.values[name].tensor
            return Failure("value", f"the value of {name}", _formula(name, tensor), inputs_at(point),
                           example.sizes, reference[keep][point], actual_values[name][point], allowed,
                           line=_line(spec, name))
    for name in _backward_order(spec, prepared.gradients):
        reference, error = reference_gradients[name]
        failure = _compare(reference[keep], error[keep], actual_gradients[name], dtype)
        if failure is not None:
            point, allowed = failure
            tensor = prepared.gradients[name].tensor
            return Failure("gradient", f"∂{spec.output}/∂{name}", _formula(f"∂{spec.output}/∂{name}", tensor),
                           inputs_at(point), example.sizes, reference[keep][point],
                           actual_gradients[name][point], allowed, line=_line(spec, name), blame=_blame(spec, name))
    for claim, (value, error) in zip(prepared.claims, claimed):
        reference, reference_error = reference_gradients[claim.wrt]
        both_errors = error[keep] + reference_error[keep] + np.abs(value[keep])
        failure = _compare(reference[keep], both_errors, value[keep], torch.float64)
        if failure is not None:
            point, allowed = failure
            derivative = prepared.gradients[claim.wrt].tensor
            return Failure("claim", f"grad({spec.output}, {claim.wrt})",
                           _formula(f"∂{spec.output}/∂{claim.wrt}", derivative), inputs_at(point), example.sizes,
                           reference[keep][point], value[keep][point], allowed, line=claim.line,
                           reference_label="derivative", actual_label="claimed", claim=claim.text)
    result.points += int(keep.sum())
    return None


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


def _accepted_points(batch: int, dtype: torch.dtype, rejected: Counter, keep: np.ndarray, checks: list) -> np.ndarray:
    """Points where every reference value is defined, fits the dtype with room to spare, is
    no subnormal number, and has a finite error bound.

    The others are counted by reason and left out: there the math is undefined, or the
    result overflows or underflows the dtype, or a step on the way does.
    """
    keep = keep.copy()
    limit = representable_limit(dtype)
    tiny = underflow_limit(dtype)
    dtype_name = str(dtype).replace("torch.", "")
    for label, (value, error) in checks:
        value, error = value.reshape(batch, -1), error.reshape(batch, -1)
        defined = ~np.isnan(value).any(axis=1)
        with np.errstate(all="ignore"):
            room = allowed_error(value, error, dtype)
            room = np.where(np.isfinite(room), room, 0)  # an unbounded step has its own reason
            fits = defined & (np.abs(value) + room <= limit).all(axis=1)
        normal = ~((value != 0) & (np.abs(value) < tiny)).any(axis=1)
        bounded = np.isfinite(error).all(axis=1)
        for reason, bad in ((f"{label} is undefined", ~defined),
                            (f"{label} overflows {dtype_name}", ~fits),
                            (f"{label} underflows {dtype_name}", ~normal),
                            (f"a step of {label} overflows or underflows {dtype_name}", ~bounded)):
            newly = keep & bad
            if newly.any():
                rejected[reason] += int(newly.sum())
                keep &= ~bad
    return keep


def autograd_side(prepared: Plan, example: Example, keep: np.ndarray, dtype: torch.dtype) -> tuple:
    """Torch on the accepted points: (values, gradients, grad_fn names), arrays in float64."""
    spec = prepared.spec
    leaves = {name: torch.tensor(array[keep], dtype=dtype, requires_grad=True)
              for name, array in example.inputs.items()}
    outputs = prepared.program.run(leaves, example.sizes, dtype)
    batch = int(keep.sum())
    if example.cotangent is None:
        seed_gradient = torch.ones(batch, dtype=dtype)
    else:
        seed_gradient = torch.tensor(example.cotangent[keep], dtype=dtype)
    outputs[spec.output].backward(seed_gradient)

    def as_array(tensor, shape):
        full = (batch, *concrete_shape(shape, example.sizes))
        if tensor is None:
            return np.zeros(full)
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().to(torch.float64).numpy()
        return np.broadcast_to(np.asarray(tensor, dtype=np.float64), full)

    values = {name: as_array(outputs[name], ref.tensor.shape) for name, ref in prepared.values.items()}
    gradients, grad_fns = {}, {}
    for name, reference in prepared.gradients.items():
        holder = leaves[name] if name in leaves else outputs[name]
        gradients[name] = as_array(holder.grad, reference.tensor.shape)
        grad_fns[name] = type(holder.grad_fn).__name__ if holder.grad_fn is not None else "(leaf)"
    return values, gradients, grad_fns


def _torch_overflowed(values: dict, gradients: dict) -> np.ndarray:
    arrays = [*values.values(), *gradients.values()]
    return np.logical_or.reduce([~np.isfinite(a.reshape(len(a), -1)).all(axis=1) for a in arrays])


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
