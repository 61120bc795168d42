"""The plan of a spec: all of its sympy work, done once and cached.

``plan`` lowers a spec to sympy, differentiates it, proves its claims and compiles every
formula to numeric code (``verify.reference``). The checks of each batch, and the engine's
runs, read the plan; nothing here draws or compares.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import sympy
import torch

from .errors import SpecError
from .ir import Apply, Constant, SizeRef, Spec, concrete_shape, graph_nodes
from .lower.sympy import (
    ADJOINT_PREFIX,
    TANGENT_PREFIX,
    Clock,
    OutOfTime,
    SympyLowering,
    Tensor,
    _broadcast_index,
    derive,
    directional_derivative,
    forward_chain,
    gradient_in_inputs,
    mark_kernel,
    why_unproved,
    second_derivative,
    time_limit,
)
from .ops import COMPARISONS, CONCRETE_ONLY, REGISTRY
from .reference import Reference
from .strategies import Example
from .subject import SpecSubject


@dataclass
class ClaimPlan:
    text: str
    line: int
    kind: str  # "grad" or "hessian"
    wrt: str
    claimed: Tensor
    unproved: str | None  # why sympy did not prove it; None where it did
    reference: Reference  # the claimed closed form
    derivative: Reference  # sympy's derivative it is claimed to equal
    formula: Tensor  # that derivative in the inputs alone, as proved and shown

    @property
    def proved(self) -> bool:
        return self.unproved is None


@dataclass
class Plan:
    """Everything a spec needs at run time; built once, reused for every example and dtype.

    Values and derivatives are evaluated one op at a time, as torch runs them: ``values`` in
    graph order, ``adjoints`` from the output back, tangents from the inputs on."""

    spec: Spec
    values: dict  # label -> Reference of each node's step (its op on its operands' values)
    adjoints: dict  # label -> Reference of ∂o/∂label from its consumers' (against the cotangent, for a non-scalar o)
    claims: list
    subject: SpecSubject
    nodes: dict  # label -> node
    sizes: dict | None = None  # the sizes it was derived for, where it needs concrete ones
    tangents: dict | None = None  # label -> Reference, derived when forward mode is first checked
    hvps: dict | None = None  # input name -> Reference, derived when order 2 is first checked

    @functools.cached_property
    def gradients(self) -> dict:
        """∂o/∂name for the inputs and named nodes: the gradients torch's backward reports."""
        return {name: adjoint for name, adjoint in self.adjoints.items()
                if name in self.spec.inputs or name in self.spec.nodes}

    @functools.cached_property
    def upstream(self) -> dict:
        """Label -> the labels whose values it depends on, itself included."""
        labels = {id(node): label for label, node in self.nodes.items()}
        memo = {}

        def visit(node) -> frozenset:
            if id(node) not in memo:
                found = {labels[id(node)]} if id(node) in labels else set()
                for operand in node.args:
                    found |= visit(operand)
                memo[id(node)] = frozenset(found)
            return memo[id(node)]

        return {label: visit(node) for label, node in self.nodes.items()}

    @functools.cached_property
    def backward_reads(self) -> dict:
        """Label -> the node values that ∂o/∂label is computed from, along the chain rule's
        formulas (each reads its op's operands, or its saved result, and its consumers' adjoints)."""
        return _reads({label: adjoint.tensor.expr for label, adjoint in self.adjoints.items()}, ADJOINT_PREFIX,
                      self.values)

    def forward_reads(self) -> dict:
        """Label -> the node values that its tangent is computed from, along forward mode's formulas."""
        return _reads({label: tangent.tensor.expr for label, tangent in self.forward_mode().items()},
                      TANGENT_PREFIX, self.values)

    def forward_mode(self) -> dict:
        """The tangent of each node, one op at a time (``forward_chain``), as forward mode
        computes it: the JVP is the output's."""
        if self.tangents is None:
            self.tangents = {label: Reference(t, frozenset(self.spec.size_symbols), a_priori=True)
                             for label, t in forward_chain(self.spec, {v: k for k, v in self.nodes.items()},
                                                           self.sizes).items()}
        return self.tangents

    def second_order(self) -> dict:
        """Hessian-vector products: the directional derivative of each input's gradient in the
        inputs alone (``gradient_in_inputs``)."""
        if self.hvps is None:
            self.hvps = {}
            for name, node in self.spec.inputs.items():
                if name in self.gradients:
                    gradient = gradient_in_inputs(self.spec, node, name, self.sizes)
                    self.hvps[name] = Reference(directional_derivative(gradient, self.spec),
                                                frozenset(self.spec.size_symbols), a_priori=True)
        return self.hvps


def _reads(formulas: dict, prefix: str, values: dict) -> dict:
    """Label -> the value labels its formula reads, directly or through the formulas of the
    labels it reads under ``prefix`` (an adjoint's, a tangent's)."""
    direct = {}
    for label, expr in formulas.items():
        direct[label] = {base.name for base in expr.atoms(sympy.IndexedBase)} | {
            symbol.name for symbol in expr.free_symbols if isinstance(symbol, sympy.Symbol)}
    found = {}

    def visit(label: str) -> frozenset:
        if label not in found:
            found[label] = frozenset()  # a cycle cannot arise; this guards the recursion all the same
            names = direct.get(label, set())
            reads = {name for name in names if name in values}
            for name in names:
                if name.startswith(prefix) and name[len(prefix):] != label:
                    reads |= visit(name[len(prefix):])
            found[label] = frozenset(reads)
        return found[label]

    return {label: visit(label) for label in formulas}


# Plans by spec, the least recently used dropped first: a run over thousands of spec files
# keeps only the recent ones.
_PLANS: OrderedDict = OrderedDict()
PLAN_CACHE_SIZE = 64
PLAN_SECONDS = 60.0  # the sympy work of one spec: realistic ones take well under a second


def plan(spec: Spec, sizes: dict | None = None) -> Plan:
    """The sympy work for ``spec``, done once per spec text and cached.

    Specs with an op that index notation cannot express (``det``, ``inv``) are derived per
    size instead, so they need ``sizes``.
    """
    concrete = needs_concrete_sizes(spec)
    # Specs built in Python have no text of their own: they are cached by identity.
    key = (spec.source or id(spec), spec.path, tuple(sorted(sizes.items())) if concrete else None)
    if key not in _PLANS:
        _PLANS[key] = _within_budget(spec, sizes if concrete else None)
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return _PLANS[key]


def forget_plans() -> None:
    """Drop every cached plan and derivation: the next ``plan`` of any spec starts from scratch."""
    _PLANS.clear()
    _DERIVED.clear()


def _within_budget(spec: Spec, sizes: dict | None) -> Plan:
    """``build_plan``, refused with a ``SpecError`` at the statement where the time went once
    it runs past ``PLAN_SECONDS``."""
    clock = Clock()
    try:
        with time_limit(PLAN_SECONDS):
            return build_plan(spec, labelled_nodes(spec), sizes, clock)
    except OutOfTime:
        loc, spent = clock.slowest()
        raise SpecError(f"the sympy work on this spec ran past its budget of {PLAN_SECONDS:g} s; {spent:.1f} s of it "
                        f"went to {loc.text if loc else 'the spec'}", source=spec.source, path=spec.path,
                        line=loc.line if loc else None, column=loc.column if loc else None,
                        hint="name intermediate steps, or split the spec") from None


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


def build_plan(spec: Spec, tracked: dict, sizes: dict | None = None, clock: Clock | None = None) -> Plan:
    """Derive, prove and compile the steps and adjoints of ``tracked`` (node -> label),
    charging ``clock`` with the time spent on each node and claim."""
    clock = clock or Clock()
    nodes = {label: node for node, label in tracked.items()}
    values, adjoints = _references(spec, tracked, nodes, sizes, clock)
    claims = []
    for claim in spec.claims:
        with clock.on(claim.loc):
            claims.append(_claim_plan(spec, claim, adjoints, sizes))
    return Plan(spec, values, adjoints, claims, SpecSubject(spec, tracked), nodes, sizes=sizes)


# Compiled steps and adjoints by the spec's text without its claims, which do not change them:
# a spec and the same spec with a claim added or changed (a user's next try, the suite's false
# claims) share them.
_DERIVED: OrderedDict = OrderedDict()


def _references(spec: Spec, tracked: dict, nodes: dict, sizes: dict | None, clock: Clock) -> tuple:
    """(values, adjoints): label -> Reference of each node's step, and of ∂o/∂label."""
    statements = _without_claims(spec)
    key = (statements, tuple(sorted(sizes.items())) if sizes else None)
    if statements is not None and key in _DERIVED:
        _DERIVED.move_to_end(key)
        return _DERIVED[key]
    derivation = derive(spec, tracked, sizes, clock)
    size_names = frozenset(spec.size_symbols)
    values, adjoints = {}, {}
    for label, step in derivation.values.items():
        with clock.on(nodes[label].loc):
            values[label] = Reference(Tensor(mark_kernel(nodes[label], step.expr, "value"), step.indices, step.shape),
                                      size_names)
    for label, adjoint in derivation.adjoints.items():
        with clock.on(nodes[label].loc):
            # Torch's derivative formulas are equal to sympy's, not the same: their bounds get a
            # floor. The output's adjoint is the cotangent, which torch takes as it is.
            adjoints[label] = Reference(adjoint, size_names, a_priori=label != spec.output)
    if statements is not None:
        _DERIVED[key] = values, adjoints
        while len(_DERIVED) > PLAN_CACHE_SIZE:
            _DERIVED.popitem(last=False)
    return values, adjoints


def _without_claims(spec: Spec) -> str | None:
    """The spec's text with each claim cut out where its Loc says, and blank lines and trailing
    spaces dropped; None for a spec built in Python (no text) or a claim not found there."""
    if not spec.source:
        return None
    starts = [0]
    for line in spec.source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    text = spec.source
    for claim in sorted(spec.claims, key=lambda c: (c.loc.line, c.loc.column), reverse=True):
        at = starts[claim.loc.line - 1] + claim.loc.column - 1
        if text[at:at + len(claim.loc.text)] != claim.loc.text:
            return None
        text = text[:at] + text[at + len(claim.loc.text):]
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def _claim_plan(spec: Spec, claim, adjoints: dict, sizes: dict | None) -> ClaimPlan:
    """A claim, proved (or not) against sympy's derivative of the whole formula."""
    size_names = frozenset(spec.size_symbols)
    lowering = SympyLowering(spec, sizes=sizes)
    node = spec.inputs.get(claim.wrt) or spec.nodes[claim.wrt]
    derivative = gradient_in_inputs(spec, node, claim.wrt, sizes)
    if claim.kind == "hessian":
        derivative = second_derivative(derivative, spec, claim.wrt, lowering)
        derivative_reference = Reference(derivative, size_names)
    else:
        derivative_reference = adjoints[claim.wrt]
    shape = derivative.shape
    claimed_expr = lowering.element(claim.expr, _broadcast_index(derivative.indices, shape, claim.expr.shape))
    claimed = Tensor(claimed_expr, derivative.indices, shape)
    return ClaimPlan(claim_text(claim), claim.loc.line, claim.kind, claim.wrt, claimed,
                     why_unproved(derivative, claimed_expr, spec), Reference(claimed, size_names), derivative_reference,
                     derivative)


def claim_text(claim) -> str:
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
    return cotangent, ({name: np.zeros_like(array) if spec.inputs[name].data else np.ones_like(array)
                        for name, array in inputs.items()} if tangents else None)
