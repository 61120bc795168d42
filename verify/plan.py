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
import torch

from .ir import Apply, Constant, SizeRef, Spec, concrete_shape, graph_nodes
from .lower.sympy import (
    SympyLowering,
    Tensor,
    _broadcast_index,
    chain_rule,
    derive,
    directional_derivative,
    forward_chain,
    prove_equal,
    second_derivative,
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
    sizes: dict | None = None  # the sizes it was derived for, where it needs concrete ones
    adjoints: dict | None = None  # label -> Reference, derived when the exact pass first models an allowance
    tangents: dict | None = None  # the same, forward

    def chained_forward(self) -> dict:
        """The tangent of each node, one op at a time (``forward_chain``): what forward mode
        computes, step by step, for the exact pass's model of a JVP's rounding."""
        if self.tangents is None:
            self.tangents = {name: Reference(t, frozenset(self.spec.size_symbols), a_priori=True)
                             for name, t in forward_chain(self.spec, {v: k for k, v in self.nodes.items()},
                                                          self.sizes).items()}
        return self.tangents

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

    def chained(self) -> dict:
        """∂o/∂label for each node, by the chain rule one op at a time (``chain_rule``): what a
        backward computes, step by step, for the exact pass's model of a gradient's rounding."""
        if self.adjoints is None:
            self.adjoints = {name: Reference(t, frozenset(self.spec.size_symbols), a_priori=True)
                             for name, t in chain_rule(self.spec, {v: k for k, v in self.nodes.items()},
                                                       self.sizes).items()}
        return self.adjoints

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
        claims.append(ClaimPlan(claim_text(claim), claim.loc.line, claim.kind, claim.wrt, claimed,
                                prove_equal(derivative, claimed_expr), Reference(claimed, size_names),
                                derivative_reference))
    return Plan(spec, values, steps, gradients, claims, SpecSubject(spec, tracked),
                {v: k for k, v in tracked.items()}, sizes=sizes)


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
