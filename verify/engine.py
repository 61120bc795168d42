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

from .errors import Mismatch
from .ir import Ref, Spec, concrete_shape
from .lower.sympy import COTANGENT, SympyLowering, Tensor, _broadcast_index, derive, prove_equal
from .lower.torch import TorchProgram
from .reference import ERROR_DTYPE, Context, Reference
from .report import CHECKED, REFUTED, ClaimResult, Failure, Result, proved
from .strategies import Example, examples
from .tolerance import UNIT_ROUNDOFF, allowed_error, representable_limit


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
    values: dict  # name -> Reference of each named node
    gradients: dict  # name -> Reference of ∂o/∂name
    claims: list
    program: TorchProgram
    cotangent_shape: tuple | None


_PLANS: dict = {}


def plan(spec: Spec) -> Plan:
    """The sympy work for ``spec``, done once per spec text and cached."""
    key = (spec.source, spec.path)
    if key not in _PLANS:
        tracked = {node: name for name, node in spec.inputs.items()}
        tracked.update({node: name for name, node in spec.nodes.items()})
        _PLANS[key] = build_plan(spec, tracked)
    return _PLANS[key]


def build_plan(spec: Spec, tracked: dict) -> Plan:
    """Derive, prove and compile everything for the nodes in ``tracked`` (node -> name)."""
    derivation = derive(spec, tracked)
    size_names = frozenset(spec.size_symbols)
    values = {name: Reference(t, size_names) for name, t in derivation.values.items()}
    gradients = {name: Reference(t, size_names) for name, t in derivation.gradients.items()}
    claims = []
    for claim in spec.claims:
        derivative = derivation.gradients[claim.wrt].inline(derivation.values)
        lowering = SympyLowering(spec)
        wrt_shape = spec.variable(claim.wrt).shape
        claimed_expr = lowering.element(claim.expr, _broadcast_index(derivative.indices, wrt_shape, claim.expr.shape))
        claimed = Tensor(claimed_expr, derivative.indices, wrt_shape)
        text = claim.loc.text.removeprefix("assert").strip()
        claims.append(ClaimPlan(text, claim.loc.line, claim.wrt, claimed,
                                prove_equal(derivative, claimed_expr), Reference(claimed, size_names)))
    return Plan(spec, values, gradients, claims, TorchProgram(spec, tracked), derivation.cotangent_shape)


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
    prepared = plan(spec)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    name = spec.path or "<spec>"
    result = Result(name, str(dtype).replace("torch.", ""), seed,
                    claims=[ClaimResult(c.text, c.line, c.proved) for c in prepared.claims])
    rejected = Counter()

    @settings(max_examples=max_examples, database=None, deadline=None, report_multiple_bugs=False,
              verbosity=Verbosity.quiet, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @hypothesis_seed(seed)
    @given(examples(spec, dtype, prepared.cotangent_shape))
    def agrees(example):
        failure = evaluate(prepared, example, dtype, result, rejected)
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
            failure = evaluate(prepared, point, dtype, result, rejected)
            if failure is not None:
                failure.notes.append("at the example point given in the spec")
                raise _Counterexample(failure)
    except _Counterexample as found:
        for claim in result.claims:
            if found.failure.claim == claim.text:
                claim.status = REFUTED
        raise Mismatch(found.failure.render(name, reproduce), found.failure) from None
    result.rejected = dict(rejected)
    for claim in result.claims:
        if result.points:
            claim.status = proved(spec.size_symbols) if claim.proved else CHECKED
    return result


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


def reference_side(prepared: Plan, example: Example) -> tuple:
    """The reference on a batch: (values, gradients, claimed), each entry (value, error bound)."""
    exact = np.zeros((), dtype=ERROR_DTYPE)
    ctx = Context({name: (array, np.broadcast_to(exact, array.shape)) for name, array in example.inputs.items()},
                  example.sizes, example.batch)
    if example.cotangent is not None:
        ctx.env[COTANGENT] = (example.cotangent, np.broadcast_to(exact, example.cotangent.shape))
    values = {}
    for name, reference in prepared.values.items():
        values[name] = ctx.env[name] = reference(ctx)  # gradient formulas refer to node values
    gradients = {name: reference(ctx) for name, reference in prepared.gradients.items()}
    return values, gradients, [claim.reference(ctx) for claim in prepared.claims]


def evaluate(prepared: Plan, example: Example, dtype: torch.dtype, result: Result, rejected: Counter):
    """Compare both sides on one batch; returns the first Failure, or None when all agree."""
    spec = prepared.spec
    reference_values, reference_gradients, claimed = reference_side(prepared, example)
    keep = _accepted_points(example.batch, dtype, rejected, [
        *((f"the value of {n}", value) for n, value in reference_values.items()),
        *((f"∂{spec.output}/∂{n}", value) for n, value in reference_gradients.items()),
        *((f"the claimed grad of {c.wrt}", value) for c, value in zip(prepared.claims, claimed)),
    ])
    result.examples += 1
    if not keep.any():
        return None
    actual_values, actual_gradients, _ = autograd_side(prepared, example, keep, dtype)

    def inputs_at(point):
        return {name: array[keep][point] for name, array in example.inputs.items()}

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


def _accepted_points(batch: int, dtype: torch.dtype, rejected: Counter, checks: list) -> np.ndarray:
    """Points where every reference value is finite, fits the dtype and has a finite error bound.

    The others are counted by reason and left out: there the math is undefined, or the
    result overflows the dtype, or float64 overflowed on the way to a finite result.
    """
    keep = np.ones(batch, dtype=bool)
    limit = representable_limit(dtype)
    dtype_name = str(dtype).replace("torch.", "")
    for label, (value, error) in checks:
        value, error = value.reshape(batch, -1), error.reshape(batch, -1)
        finite = np.isfinite(value).all(axis=1)
        fits = finite & (np.abs(np.where(np.isfinite(value), value, 0)) <= limit).all(axis=1)
        bounded = np.isfinite(error).all(axis=1)
        for reason, bad in ((f"{label} is undefined or not finite", ~finite),
                            (f"{label} overflows {dtype_name}", ~fits),
                            (f"{label} overflows float64 in intermediate steps", ~bounded)):
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
