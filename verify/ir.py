"""The intermediate representation: typed expression nodes with shapes.

A ``Spec`` is a small dataflow graph. Inputs are leaves; each assignment names a node;
the last assignment is the output. Dims are ``int`` or sympy ``Symbol`` (a size symbol
such as ``n``), so one ``Spec`` stands for every size at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy

Dim = int | sympy.Expr  # an int, a size symbol, or an expression in them (n - 1, n + m)
Shape = tuple  # tuple[Dim, ...]


class ShapeError(Exception):
    """Raised by shape rules; the parser turns it into a SpecError at the node's column."""


@dataclass(frozen=True)
class Loc:
    """Where a node came from in the spec text (1-based line and column) and its source."""

    line: int
    column: int
    text: str = ""


@dataclass(frozen=True)
class Domain:
    """The set an input's elements are drawn from: an interval of the reals."""

    name: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def sympy_assumptions(self) -> dict:
        """Assumptions sympy may use when simplifying expressions in this input."""
        if self.low >= 0:
            return {"positive": True} if self.low_open or self.low > 0 else {"nonnegative": True}
        if self.high <= 0:
            return {"negative": True} if self.high_open or self.high < 0 else {"nonpositive": True}
        return {"real": True}

    def __str__(self) -> str:
        if self.name != "Interval":
            return self.name
        return f"Interval({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class IntegerRange:
    """Integers ``low <= k < high``, as Python's ``range``; a bound may be a dim expression
    (class indices in [0, c) for a size symbol c). An input in it is data: an index, a label."""

    low: Dim
    high: Dim
    name = "Integer"

    def bounds(self, sizes: dict) -> tuple:
        """(low, high) at the sizes given by name."""
        return concrete_dim(self.low, sizes), concrete_dim(self.high, sizes)

    def contains(self, value: float) -> bool:
        """Whether ``value`` may lie in the range for some sizes (symbolic bounds are not known yet)."""
        if value != int(value):
            return False
        return all(not isinstance(bound, int) or test for bound, test in
                   ((self.low, self.low <= value), (self.high, value < self.high)))

    def sympy_assumptions(self) -> dict:
        nonnegative = self.low >= 0 if isinstance(self.low, int) else self.low.is_nonnegative
        return {"integer": True, "nonnegative": True} if nonnegative else {"integer": True}

    def __str__(self) -> str:
        return f"Integer({self.low}, {self.high})"


DOMAINS = {
    "Real": Domain("Real"),
    "Positive": Domain("Positive", low=0.0),
    "Negative": Domain("Negative", high=0.0),
    "NonNegative": Domain("NonNegative", low=0.0, low_open=False),
}


@dataclass(frozen=True, eq=False)
class Node:
    """One value of the graph. Identity is object identity: the graph may share nodes."""

    shape: Shape
    loc: Loc

    @property
    def args(self) -> tuple:
        return ()

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True, eq=False)
class Input(Node):
    name: str = ""
    domain: Domain = DOMAINS["Real"]
    example: object = None  # nested lists of numbers, or None
    data: bool = False  # drawn in its domain, never differentiated (a label, a mask, a target)

    @property
    def integer(self) -> bool:
        return isinstance(self.domain, IntegerRange)


@dataclass(frozen=True, eq=False)
class Constant(Node):
    value: sympy.Expr = sympy.Integer(0)  # noqa: RUF009 - exact and immutable: Rational, pi, E


@dataclass(frozen=True, eq=False)
class SizeRef(Node):
    """A size symbol used as a number, as in ``sum(x) / n``."""

    symbol: sympy.Symbol = None


@dataclass(frozen=True, eq=False)
class Ref(Node):
    """A use of a named intermediate; ``target`` is its defining expression."""

    name: str = ""
    target: Node = None

    @property
    def args(self) -> tuple:
        return (self.target,)


@dataclass(frozen=True, eq=False)
class Apply(Node):
    """An op from the registry applied to arguments, with its static parameters."""

    op: str = ""
    operands: tuple = ()
    params: tuple = ()  # sorted (key, value) pairs, e.g. (("axis", (0,)), ("keepdims", False))

    @property
    def args(self) -> tuple:
        return self.operands

    def param(self, key, default=None):
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class Claim:
    """``assert grad(of, wrt) == expr``: a closed form claimed for a derivative."""

    kind: str
    of: str
    wrt: str
    expr: Node
    loc: Loc


@dataclass
class Spec:
    """A parsed spec: inputs, named nodes in order (the last is the output), claims."""

    inputs: dict  # name -> Input, in declaration order
    nodes: dict  # name -> Node (its defining expression), in assignment order
    claims: list
    size_symbols: dict  # name -> sympy.Symbol
    source: str = ""
    path: str | None = None
    locs: dict = field(default_factory=dict)  # name -> Loc of its declaration or assignment
    size_requirements: list = field(default_factory=list)  # expressions in the sizes, each must be >= 1

    @property
    def output(self) -> str:
        return next(reversed(self.nodes))

    def variable(self, name: str) -> Node:
        """The node for an input or a named intermediate."""
        return self.inputs[name] if name in self.inputs else self.nodes[name]

    def example_point(self) -> dict | None:
        """Input values from the spec, when every input has one."""
        if any(inp.example is None for inp in self.inputs.values()):
            return None
        return {name: inp.example for name, inp in self.inputs.items()}


def depends_on_inputs(node: Node, _memo=None) -> bool:
    """True when the node's value varies smoothly with some differentiated input (not a data
    input), so it has a gradient to check. An integer (an argmax) or a condition has none,
    and none flows through an index or a condition into what they are made from."""
    from .ops import REGISTRY  # the registry knows which operands a derivative flows through

    memo = {} if _memo is None else _memo
    if id(node) not in memo:
        if isinstance(node, Input):
            memo[id(node)] = not node.data
        elif isinstance(node, Apply):
            op = REGISTRY[node.op]
            memo[id(node)] = op.result == "real" and not is_integer(node) and any(
                depends_on_inputs(node.operands[k], memo) for k in op.smooth_positions(len(node.operands)))
        else:
            memo[id(node)] = any(depends_on_inputs(a, memo) for a in node.args)
    return memo[id(node)]


def integer_range(node: Node) -> tuple:
    """(low, high) such that an integer node's values k satisfy low <= k < high."""
    if isinstance(node, Input):
        return node.domain.low, node.domain.high
    if isinstance(node, Ref):
        return integer_range(node.target)
    if node.op == "pos":
        return integer_range(node.operands[0])
    (operand,) = node.operands  # argmax, argmin: a position along their axis
    axis = dict(node.params).get("axis", -1) % operand.rank
    return 0, operand.shape[axis]


def is_integer(node: Node) -> bool:
    """Whether a node holds integers (an index, a label): usable for indexing, never differentiated."""
    from .ops import REGISTRY

    if isinstance(node, Input):
        return node.integer
    if isinstance(node, Ref):
        return is_integer(node.target)
    if isinstance(node, Apply):
        return REGISTRY[node.op].result == "integer" or node.op == "pos" and is_integer(node.operands[0])
    return False


def graph_nodes(spec: Spec) -> list:
    """Every node once, operands before the nodes that use them (a Ref leads to its target)."""
    seen, order = set(), []

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for operand in node.args:
            visit(operand)
        if not isinstance(node, Ref):
            order.append(node)

    for node in [*spec.inputs.values(), *spec.nodes.values()]:
        visit(node)
    return order


def concrete_dim(dim, sizes: dict) -> int:
    """A dim (an int, a size symbol or an expression such as n - 1) at the sizes given by name."""
    if isinstance(dim, int):
        return dim
    return int(dim.xreplace({s: sympy.Integer(sizes[s.name]) for s in dim.free_symbols}))


def concrete_shape(shape: Shape, sizes: dict) -> tuple:
    """The shape with every size symbol replaced by its value from ``sizes`` (by name)."""
    return tuple(concrete_dim(d, sizes) for d in shape)


def broadcast_shapes(*shapes: Shape) -> Shape:
    """Numpy broadcasting over dims that may be size symbols; a symbol only matches itself or 1."""
    rank = max((len(s) for s in shapes), default=0)
    result = []
    for position in range(-rank, 0):
        dims = {s[position] for s in shapes if len(s) >= -position} - {1}
        if len(dims) > 1:
            shown = " and ".join(str(d) for d in sorted(dims, key=str))
            raise ShapeError(f"cannot broadcast sizes {shown} against each other")
        result.append(dims.pop() if dims else 1)
    return tuple(result)
