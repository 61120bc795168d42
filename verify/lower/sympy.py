"""Lowering to sympy in index notation, and sympy's own derivatives of the result.

A node of shape ``(n, m)`` lowers to its element at symbolic indices ``(i, j)``; inputs are
``IndexedBase`` objects, reductions are ``Sum`` over fresh indices with symbolic bounds.
So one derivation holds for every size, and its cost does not grow with the sizes.

Derivatives come from ``sympy.diff`` alone: ∂o/∂v for a named intermediate ``v`` is the
derivative of ``o`` written with ``v`` kept as a symbol of its own, exactly what autograd's
``v.grad`` holds. Nothing here applies the chain rule by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import sympy

from ..ir import Apply, Constant, Input, Node, Ref, SizeRef, Spec, depends_on_inputs
from ..ops import REGISTRY, normalize_axes

INDEX_NAMES = "ijklpqrstuvw"
COTANGENT = "cotangent"


def _index_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, nonnegative=True)


@dataclass(frozen=True)
class Tensor:
    """A sympy element formula: ``expr`` is the element at ``indices`` of a tensor of ``shape``."""

    expr: sympy.Expr
    indices: tuple
    shape: tuple

    def inline(self, definitions: dict) -> "Tensor":
        """Replace kept symbols (``name -> Tensor``) by their own formulas."""
        expr = self.expr
        for name, definition in definitions.items():
            expr = _substitute(expr, name, definition)
        return Tensor(expr, self.indices, self.shape)


class SympyLowering:
    """Lowers nodes of one spec; nodes listed in ``keep`` stay symbols named by ``keep[node]``."""

    def __init__(self, spec: Spec, keep: dict | None = None):
        self.spec = spec
        self.keep = {id(node): name for node, name in (keep or {}).items()}
        taken = set(spec.inputs) | set(spec.nodes) | set(spec.size_symbols)
        self.free_names = [n for n in INDEX_NAMES if n not in taken]
        self.counter = count(1)

    def free_indices(self, rank: int) -> tuple:
        return tuple(_index_symbol(name) for name in self.free_names[:rank])

    def fresh_index(self, size) -> tuple:
        index = _index_symbol(f"_k{next(self.counter)}")
        return index, (index, 0, size - 1)

    def tensor(self, node: Node) -> Tensor:
        indices = self.free_indices(node.rank)
        return Tensor(self.element(node, indices), indices, node.shape)

    def element(self, node: Node, index: tuple) -> sympy.Expr:
        name = self.keep.get(id(node))
        if name is not None:
            return variable_symbol(name, node.shape, {"real": True}, index)
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise NotImplementedError(f"the sympy lowering has no rule for {type(node).__name__}")
        return method(node, index)

    def _Input(self, node: Input, index):
        return variable_symbol(node.name, node.shape, node.domain.sympy_assumptions(), index)

    def _Constant(self, node: Constant, index):
        return node.value

    def _SizeRef(self, node: SizeRef, index):
        return node.symbol

    def _Ref(self, node: Ref, index):
        return self.element(node.target, index)

    def _Apply(self, node: Apply, index):
        op = REGISTRY[node.op]
        if op.kind == "elementwise":
            return op.sympy_form(*(self.element(a, _broadcast_index(index, node.shape, a.shape))
                                   for a in node.operands))
        if op.kind == "reduction":
            (operand,) = node.operands
            axes = normalize_axes(node.param("axis"), operand.rank)
            kept = iter(index)
            operand_index, limits, total_count = [], [], sympy.Integer(1)
            for axis, size in enumerate(operand.shape):
                if axis in axes:
                    symbol, limit = self.fresh_index(size)
                    operand_index.append(symbol)
                    limits.append(limit)
                    total_count *= size
                    if node.param("keepdims", False):
                        next(kept)
                else:
                    operand_index.append(next(kept))
            body = self.element(operand, tuple(operand_index))
            total = sympy.Sum(body, *limits) if limits else body
            return op.sympy_form(total, total_count)
        return op.sympy_form(lambda position, sub_index: self.element(node.operands[position], sub_index),
                             index, [a.shape for a in node.operands], self.fresh_index)


def variable_symbol(name: str, shape: tuple, assumptions: dict, index: tuple) -> sympy.Expr:
    """The symbol of an input or kept node: a plain Symbol for scalars, else IndexedBase[index]."""
    if not shape:
        return sympy.Symbol(name, **assumptions)
    return sympy.IndexedBase(name, **assumptions)[tuple(index)]


def _broadcast_index(index: tuple, out_shape: tuple, shape: tuple) -> tuple:
    offset = len(out_shape) - len(shape)
    return tuple(sympy.Integer(0) if dim == 1 and out_shape[offset + k] != 1 else index[offset + k]
                 for k, dim in enumerate(shape))


def _substitute(expr: sympy.Expr, name: str, definition: Tensor) -> sympy.Expr:
    """Replace the kept symbol ``name`` in ``expr`` by the formula ``definition``."""
    if not definition.shape:
        return expr.xreplace({s: definition.expr for s in expr.free_symbols if s.name == name})

    def matches(e):
        return isinstance(e, sympy.Indexed) and e.base.name == name

    def element(e):
        return definition.expr.xreplace(dict(zip(definition.indices, e.indices)))

    return expr.replace(matches, element)


def settle(expr: sympy.Expr, ranges: dict) -> sympy.Expr:
    """Carry out sums of Kronecker deltas and drop conditions that the index ranges decide.

    ``ranges`` maps each free index to its largest value; every index is at least 0.
    """
    for _ in range(8):
        settled = _decide_conditions(expr.doit(), ranges)
        if settled == expr:
            break
        expr = settled
    return expr


def _decide_conditions(expr: sympy.Expr, ranges: dict) -> sympy.Expr:
    if not ranges or not expr.has(sympy.Piecewise):
        return expr
    at_least = {index: sympy.Dummy("t", integer=True, nonnegative=True) for index in ranges}
    at_most = {index: upper - sympy.Dummy("s", integer=True, nonnegative=True) for index, upper in ranges.items()}

    def decide(relation):
        if not relation.free_symbols & set(ranges):
            return relation
        # A condition that holds (or fails) for every index >= 0, or for every index <= its
        # upper bound, holds (or fails) on the whole index range.
        for substitution in (at_least, at_most):
            verdict = relation.xreplace(substitution)
            if verdict in (sympy.true, sympy.false):
                return verdict
        return relation

    return expr.replace(lambda e: isinstance(e, sympy.core.relational.Relational), decide)


@dataclass
class Derivation:
    """All sympy results for one spec, derived once for every size.

    ``values[name]``: the formula of each named node in the inputs.
    ``gradients[name]``: ∂o/∂name for each input and intermediate that depends on an input;
    it may refer to named nodes (by their symbols), whose values the reference supplies.
    ``cotangent_shape``: for a non-scalar output, o is reduced against a random cotangent.
    """

    values: dict
    gradients: dict
    cotangent_shape: tuple | None


def derive(spec: Spec, tracked: dict) -> Derivation:
    """Formulas for the nodes in ``tracked`` (node -> name), and ∂o/∂ each of them.

    ``tracked`` lists inputs, named intermediates and any other nodes to follow; each gets
    a value formula (inputs excepted) and, when it depends on an input, a gradient.
    """
    plain = SympyLowering(spec)
    values = {name: plain.tensor(node) for node, name in tracked.items() if not isinstance(node, Input)}
    output_node = spec.nodes[spec.output]
    cotangent_shape = output_node.shape or None
    gradients = {}
    for node, name in tracked.items():
        if not depends_on_inputs(node):
            continue
        keep = {} if isinstance(node, Input) else {node: name}
        lowering = SympyLowering(spec, keep)
        scalar = _scalar_output(lowering, output_node)
        indices = lowering.free_indices(node.rank)
        variable = variable_symbol(name, node.shape, node.domain.sympy_assumptions()
                                   if isinstance(node, Input) else {"real": True}, indices)
        ranges = {index: size - 1 for index, size in zip(indices, node.shape)}
        gradient = settle(sympy.diff(scalar, variable), ranges)
        if gradient.has(sympy.Derivative):
            raise NotImplementedError(f"sympy left an unevaluated derivative in ∂o/∂{name}: {gradient}")
        gradients[name] = Tensor(gradient, indices, node.shape)
    return Derivation(values, gradients, cotangent_shape)


def _scalar_output(lowering: SympyLowering, output_node: Node) -> sympy.Expr:
    """o itself when scalar, else the sum of o against a cotangent, as backward(cotangent) sees it."""
    if not output_node.shape:
        return lowering.element(output_node, ())
    cotangent = sympy.IndexedBase(COTANGENT, real=True)
    limits, index = [], []
    for size in output_node.shape:
        symbol, limit = lowering.fresh_index(size)
        index.append(symbol)
        limits.append(limit)
    return sympy.Sum(cotangent[tuple(index)] * lowering.element(output_node, tuple(index)), *limits)


def prove_equal(derivative: Tensor, claimed: sympy.Expr) -> bool:
    """True when sympy shows ``derivative == claimed`` for every size and index in range."""
    ranges = {index: size - 1 for index, size in zip(derivative.indices, derivative.shape)}
    difference = settle(derivative.expr - claimed, ranges)
    return sympy.simplify(difference) == 0
