"""Lowering to sympy in index notation, and sympy's own derivatives of the result.

A node of shape ``(n, m)`` lowers to its element at symbolic indices ``(i, j)``; inputs are
``IndexedBase`` objects, reductions are ``Sum`` over fresh indices with symbolic bounds.
So one derivation holds for every size, and its cost does not grow with the sizes.

Derivatives come from ``sympy.diff``, one op at a time: ∂o/∂v is the chain rule over the
spec's graph (``chain_rule``), each term sympy's derivative of one consumer's step with
respect to v, kept as a symbol of its own. So the sympy work grows with the graph, where the
derivative of the whole formula grows with its depth (a softmax of a softmax holds its input
four times). Claims are proved against the whole formula's derivative (``gradient_in_inputs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
import time
from dataclasses import dataclass
from itertools import count

import mpmath
import sympy
from sympy.concrete.delta import _expand_delta, _extract_delta, deltasummation
from sympy.concrete.expr_with_limits import ExprWithLimits
from sympy.simplify.simplify import factor_sum

from ..ir import (
    Apply,
    Constant,
    Input,
    Node,
    Ref,
    SizeRef,
    Spec,
    concrete_dim,
    concrete_shape,
    depends_on_inputs,
    is_integer,
)
from ..ops import REGISTRY, SIZE_PARAMS, concrete_items, normalize_axes, single_axis
from .functions import ReducedMax, ReducedMin, elementary, fresh_index_symbol, index_symbol, kernel_of, select
from .sample import Unsupported, sample_value

INDEX_NAMES = "ijklpqrstuvw"
# Names a spec cannot use (spec names never start with "_" or hold a space).
COTANGENT = "_cotangent"
TANGENT_PREFIX = "_tangent_"
ADJOINT_PREFIX = "_adjoint_"


@dataclass(frozen=True)
class Tensor:
    """A sympy element formula: ``expr`` is the element at ``indices`` of a tensor of ``shape``."""

    expr: sympy.Expr
    indices: tuple
    shape: tuple

    def inline(self, definitions: dict) -> Tensor:
        """Replace kept symbols (``name -> Tensor``) by their own formulas."""
        expr = self.expr
        for name, definition in definitions.items():
            expr = _substitute(expr, name, definition)
        return Tensor(expr, self.indices, self.shape)


class SympyLowering:
    """Lowers nodes of one spec; nodes listed in ``keep`` stay symbols named by ``keep[node]``.

    With ``sizes`` (name -> int), every dim is concrete: the fallback for ops that index
    notation cannot express (``det``, ``inv``), derived once per drawn size.
    """

    def __init__(self, spec: Spec, keep: dict | None = None, sizes: dict | None = None):
        self.spec = spec
        self.keep = {id(node): name for node, name in (keep or {}).items()}
        self.sizes = sizes
        taken = set(spec.inputs) | set(spec.nodes) | set(spec.size_symbols)
        spare = (f"i{k}" for k in count(1))
        self.free_names = [n for n in INDEX_NAMES if n not in taken] + [n for n, _ in zip(spare, range(32))
                                                                          if n not in taken]

    def shape(self, node: Node) -> tuple:
        return node.shape if self.sizes is None else concrete_shape(node.shape, self.sizes)

    def free_indices(self, rank: int) -> tuple:
        return tuple(index_symbol(name) for name in self.free_names[:rank])

    def fresh_index(self, size, upper=None) -> tuple:
        """A new summation index over 0..size-1 (or 0..upper), with its limits."""
        index = fresh_index_symbol()
        return index, (index, 0, size - 1 if upper is None else upper)

    def tensor(self, node: Node) -> Tensor:
        indices = self.free_indices(node.rank)
        return Tensor(self.element(node, indices), indices, self.shape(node))

    def element(self, node: Node, index: tuple) -> sympy.Expr:
        name = self.keep.get(id(node))
        if name is not None:
            return variable_symbol(name, node.shape, {"integer": True} if is_integer(node) else {"real": True}, index)
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise NotImplementedError(f"the sympy lowering has no rule for {type(node).__name__}")
        return method(node, index)

    def _Input(self, node: Input, index):
        return variable_symbol(node.name, node.shape, node.domain.sympy_assumptions(), index)

    def _Constant(self, node: Constant, index):
        return node.value

    def _SizeRef(self, node: SizeRef, index):
        return node.symbol if self.sizes is None else sympy.Integer(self.sizes[node.symbol.name])

    def _Ref(self, node: Ref, index):
        return self.element(node.target, index)

    def _Apply(self, node: Apply, index):
        op = REGISTRY[node.op]
        params = dict(node.params)
        if op.kind == "elementwise":
            return op.sympy_form(*(self.element(a, _broadcast_index(index, node.shape, a.shape))
                                   for a in node.operands))
        (operand, *_) = node.operands
        if op.kind == "reduction":
            extra = {k: v for k, v in params.items() if k not in ("axis", "keepdims")}
            return op.sympy_form(_Over(self, operand, index, params), **extra)
        if op.kind == "axiswise":
            return op.sympy_form(_Along(self, operand, index, single_axis(params, operand.rank)))
        if self.sizes is not None:
            if "items" in params:
                params["items"] = concrete_items(params["items"], self.sizes)
            for key in SIZE_PARAMS & params.keys():
                params[key] = concrete_shape(params[key], self.sizes) if key == "shape" else concrete_dim(
                    params[key], self.sizes)
        return op.sympy_form(lambda position, sub_index: self.element(node.operands[position], sub_index),
                             index, [self.shape(a) for a in node.operands], self.fresh_index, params)


class _Over:
    """The reduced axes of one reduction, for the op's sympy form: sums, products, extrema."""

    def __init__(self, lowering: SympyLowering, operand: Node, index: tuple, params: dict):
        self.lowering = lowering
        self.operand = operand
        self.axes = normalize_axes(params.get("axis"), operand.rank)
        self.keepdims = params.get("keepdims", False)
        self.index = index
        self.dims = lowering.shape(operand)
        self.count = sympy.Integer(1)
        for axis in self.axes:
            self.count *= self.dims[axis]

    def _each(self, f, combine):
        kept = iter(self.index)
        operand_index, limits = [], []
        for axis, size in enumerate(self.dims):
            if axis in self.axes:
                symbol, limit = self.lowering.fresh_index(size)
                operand_index.append(symbol)
                limits.append(limit)
                if self.keepdims:
                    next(kept)
            else:
                operand_index.append(next(kept))
        body = f(self.lowering.element(self.operand, tuple(operand_index)))
        return combine(body, *limits) if limits else body

    def sum(self, f):
        return self._each(f, sympy.Sum)

    def product(self, f):
        return self._each(f, sympy.Product)

    def max(self, f):
        return self._each(f, ReducedMax)

    def min(self, f):
        return self._each(f, ReducedMin)


class _Along:
    """One axis of an axiswise op: the element here, and sums or products along the axis."""

    def __init__(self, lowering: SympyLowering, operand: Node, index: tuple, axis: int):
        self.lowering = lowering
        self.operand = operand
        self.index = index
        self.axis = axis
        self.here = lowering.element(operand, index)

    def _each(self, f, combine, upto_here):
        size = self.lowering.shape(self.operand)[self.axis]
        k, limits = self.lowering.fresh_index(size, self.index[self.axis] if upto_here else None)
        moved = tuple(k if axis == self.axis else i for axis, i in enumerate(self.index))
        return combine(f(self.lowering.element(self.operand, moved)), limits)

    def sum(self, f, upto_here=False):
        return self._each(f, sympy.Sum, upto_here)

    def product(self, f, upto_here=False):
        return self._each(f, sympy.Product, upto_here)


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


def index_ranges(indices: tuple, shape: tuple) -> dict:
    """Each free index -> its largest value (every index is at least 0)."""
    return {index: size - 1 for index, size in zip(indices, shape)}


def settle(expr: sympy.Expr, ranges: dict) -> sympy.Expr:
    """Carry out sums of Kronecker deltas and drop conditions that the index ranges decide.

    ``ranges`` maps each free index to its largest value; every index is at least 0.
    """
    for _ in range(8):
        settled = _decide_conditions(_carried_out(expr), ranges)
        if settled == expr or _leaks_bound_index(settled):
            # sympy 1.14 can pull a Piecewise whose condition holds the summation index out
            # of its Sum; then the unsummed form, still correct, is kept.
            break
        expr = settled
    return expr


def _carried_out(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with its sums of Kronecker deltas carried out and sums of index-free terms
    counted, bottom-up. Other sums stay: the reference evaluates them as reductions.

    Not ``doit()``: that tries symbolic summation (Gosper's algorithm, hypergeometric
    terms) on terms holding array elements, which never succeeds, can take minutes
    (layer normalization's gradient) and, in sympy 1.14, can raise TypeError.
    """
    if not expr.args or isinstance(expr, (sympy.Indexed, sympy.Symbol)):
        return expr
    if isinstance(expr, ExprWithLimits):
        if any(not index.is_integer for index, _, _ in expr.limits):
            # sympy's derivative of a Product sums over a Dummy without integer assumptions.
            renamed = {index: fresh_index_symbol() for index, _, _ in expr.limits if not index.is_integer}
            expr = type(expr)(expr.function.xreplace(renamed),
                              *((renamed.get(i, i), low, high) for i, low, high in expr.limits))
        function = _carried_out(expr.function)
        if isinstance(expr, sympy.Sum):
            for limit in _deltas_first(expr.limits, function):
                function = sympy.Add(*(_summed(term, limit) for term in sympy.Add.make_args(function)))
            return function
        reduced = type(expr)(function, *expr.limits)
        return reduced.doit(deep=False) if isinstance(expr, ReducedMax) else reduced
    return expr.func(*(_carried_out(a) for a in expr.args))


def _deltas_first(limits: tuple, function: sympy.Expr) -> tuple:
    """The limits of a sum (the first is the innermost), those whose index a Kronecker delta
    pins first, where no bound depends on another limit's index: summed in sympy's order, a
    delta of an outer index sits in an inner Sum by then, out of reach (the VJP of A @ B)."""
    indices = {index for index, _, _ in limits}
    if len(limits) < 2 or any((low.free_symbols | high.free_symbols) & indices
                              for _, low, high in limits):
        return limits
    pinned = {s for delta in function.atoms(sympy.KroneckerDelta) for s in delta.free_symbols}
    return tuple(sorted(limits, key=lambda limit: limit[0] not in pinned))


def _summed(term: sympy.Expr, limit: tuple) -> sympy.Expr:
    index, low, high = limit
    if index not in term.free_symbols:
        return term * (high - low + 1)
    expanded = _expand_delta(term, index)
    if expanded.is_Add:
        return sympy.Add(*(_summed(t, limit) for t in expanded.args))
    delta, _ = _extract_delta(expanded, index)
    if delta is None:
        return sympy.Sum(expanded, limit)
    return deltasummation(expanded, limit)


SAMPLE_SIZE = 3
MAX_PROOF_OPS = 400
PROOF_SECONDS = 10.0  # per claim; past it the claim is checked numerically, not proved
SAMPLE_SECONDS = 2.0  # per formula; past it sympy's summed form is not trusted, the raw one is kept


def _same_at_a_sample(raw, settled, spec: Spec, free: dict) -> bool:
    """Whether two forms of a formula agree at one concrete size and pseudo-random point:
    sympy's own check that carrying out its sums changed nothing."""
    bound = {symbol: SAMPLE_SIZE for symbol in spec.size_symbols.values()}
    bound.update((index, 1 if not isinstance(size, int) or size > 1 else 0) for index, size in free.items())
    try:
        with time_limit(SAMPLE_SECONDS):  # exp(exp(exp(...))) at a point has astronomically many digits
            left, right = sample_value(raw, bound), sample_value(settled, bound)
        return abs(left - right) <= 1e-20 * (1 + abs(left))
    except (OutOfTime, Unsupported, ArithmeticError, TypeError, ValueError):
        return False  # no evidence that they agree


def _differ_at_a_sample(left, right, spec: Spec, free: dict) -> bool:
    """Whether two formulas surely differ at one concrete size and pseudo-random point, where
    that point lies inside every input's domain (its values are in [1/499, 2]; integer inputs
    are 1, which a range may not hold, so specs with them are not sampled)."""
    lowest, highest = 1 / 499, 997 / 499  # the sampler's range of real values
    if any(declared.integer or not (declared.domain.contains(lowest) and declared.domain.contains(highest))
           for declared in spec.inputs.values()):
        return False
    bound = {symbol: SAMPLE_SIZE for symbol in spec.size_symbols.values()}
    bound.update((index, 1 if not isinstance(size, int) or size > 1 else 0) for index, size in free.items())
    try:
        with time_limit(SAMPLE_SECONDS):
            first, second = sample_value(left, bound), sample_value(right, bound)
        return bool(mpmath.isfinite(first) and mpmath.isfinite(second)
                    and abs(first - second) > 1e-20 * (1 + abs(first)))
    except (OutOfTime, Unsupported, ArithmeticError, TypeError, ValueError):
        return False  # no evidence that they differ


def _leaks_bound_index(expr) -> bool:
    return any(symbol.name.startswith("_k") for symbol in expr.free_symbols)


def _decide_conditions(expr: sympy.Expr, ranges: dict) -> sympy.Expr:
    if not ranges or not expr.has(sympy.Piecewise, select):
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
    """All sympy results for one spec, derived once for every size, one op at a time.

    ``values[label]``: each node's step: its op on its operands' symbols. Evaluated along the
    graph, as torch runs it, the steps round where torch does: ``(x + 2**60) - 2**60`` is 0
    in float64, though sympy would simplify the formula in the inputs to ``x``.
    ``adjoints[label]``: ∂o/∂label for each node that depends on an input, from ``chain_rule``:
    the adjoints of its consumers (symbols named by ``adjoint_name``) times sympy's derivative
    of their steps. For a non-scalar output, o is reduced against a random cotangent first.
    """

    values: dict
    adjoints: dict


def derive(spec: Spec, tracked: dict, sizes: dict | None = None, clock=None) -> Derivation:
    """The steps and adjoints of the nodes in ``tracked`` (node -> label). The sympy work of
    each is local to its op, so it grows with the graph, not with its depth. ``sizes`` makes
    every dim concrete; ``clock`` (a ``Clock``) is charged with the time spent on each node."""
    clock = clock or Clock()
    operands = {node: label for node, label in tracked.items() if not isinstance(node, Input)}
    values = {}
    for node, label in operands.items():
        with clock.on(node.loc):
            values[label] = SympyLowering(spec, {n: m for n, m in operands.items() if n is not node}, sizes).tensor(node)
    return Derivation(values, chain_rule(spec, tracked, sizes, clock))


class Clock:
    """The time spent per place in the spec (a Loc), to name the statement where it went."""

    def __init__(self):
        self.spent = {}

    @contextlib.contextmanager
    def on(self, loc):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.spent[loc] = self.spent.get(loc, 0.0) + time.perf_counter() - started

    def slowest(self) -> tuple:
        """(loc, seconds) of the place that took the longest; (None, 0) before any."""
        return max(self.spent.items(), key=lambda item: item[1], default=(None, 0.0))


def in_inputs(spec: Spec, node: Node, sizes: dict | None = None) -> Tensor:
    """The formula of ``node`` in the inputs alone: every step inlined."""
    return SympyLowering(spec, sizes=sizes).tensor(node)


def gradient_in_inputs(spec: Spec, node: Node, label: str, sizes: dict | None = None) -> Tensor:
    """∂o/∂label in the inputs alone, from ``sympy.diff`` of the whole spec: what a claim
    about it is proved against, and what a Hessian differentiates again. Its size grows with
    the spec's depth, so only claims and second order ask for it."""
    keep = {} if isinstance(node, Input) else {node: label}
    lowering = SympyLowering(spec, keep, sizes)
    scalar = _scalar_output(lowering, spec.nodes[spec.output])
    indices = lowering.free_indices(node.rank)
    variable = variable_symbol(label, node.shape, node.domain.sympy_assumptions()
                               if isinstance(node, Input) else {"real": True}, indices)
    shape = lowering.shape(node)
    gradient = Tensor(_settled(sympy.diff(scalar, variable), spec, indices, shape), indices, shape)
    if gradient.expr.has(sympy.Derivative):
        raise NotImplementedError(f"sympy left an unevaluated derivative in ∂o/∂{label}: {gradient.expr}")
    return gradient if isinstance(node, Input) else gradient.inline({label: in_inputs(spec, node, sizes)})


def _settled(raw: sympy.Expr, spec: Spec, indices: tuple, shape: tuple) -> sympy.Expr:
    """``settle`` of a derivative, where a sample shows that it changed nothing: sympy's
    summation can go wrong with deltas in nested sums; then the raw form stays."""
    settled = settle(raw, index_ranges(indices, shape))
    if settled != raw and not _same_at_a_sample(raw, settled, spec, dict(zip(indices, shape))):
        return raw
    return settled


def adjoint_name(label: str) -> str:
    """The name under which a formula of ``chain_rule`` receives ∂o/∂label."""
    return ADJOINT_PREFIX + label


def chain_rule(spec: Spec, tracked: dict, sizes: dict | None = None, clock=None) -> dict:
    """∂o/∂label for each node of ``tracked`` (node -> label) that depends on an input, one op
    at a time, as torch's backward runs: the sum, over the nodes that use it, of each one's
    adjoint (a symbol named by ``adjoint_name``) times sympy's derivative of its step (its op
    on its operands' symbols). Evaluated from the output back, it rounds where a backward
    does: ``acosh(1 + exp(-x))`` gets acosh' at the rounded 1 + exp(-x), which the
    derivative of the whole formula would simplify away. Each consumer's term is marked as
    torch computes it (``mark_kernel``). ``clock`` is charged as in ``derive``."""
    clock = clock or Clock()
    operands = {node: name for node, name in tracked.items() if not isinstance(node, Input)}
    uses = []  # (node, its label, index, limits, its step there, the step times its adjoint's element)
    for node, name in operands.items():
        if not depends_on_inputs(node):
            continue  # no adjoint: nothing flows back through it
        lowering = SympyLowering(spec, {n: m for n, m in operands.items() if n is not node}, sizes)
        index, limits = [], []
        for size in lowering.shape(node):
            symbol, limit = lowering.fresh_index(size)
            index.append(symbol)
            limits.append(limit)
        step = lowering.element(node, tuple(index))
        uses.append((node, name, tuple(index), limits, step,
                     variable_symbol(adjoint_name(name), node.shape, {"real": True}, tuple(index)) * step))
    symbols = SympyLowering(spec, operands, sizes)
    seed = _scalar_output(symbols, spec.nodes[spec.output])  # the output's adjoint: the cotangent
    adjoints = {}
    for node, name in tracked.items():
        if not depends_on_inputs(node):
            continue
        indices = symbols.free_indices(node.rank)
        variable = variable_symbol(name, node.shape, node.domain.sympy_assumptions()
                                   if isinstance(node, Input) else {"real": True}, indices)
        base = variable.base if node.shape else variable
        shape = symbols.shape(node)
        terms = []
        with clock.on(node.loc):
            for consumer, consumer_name, index, limits, step, use in uses:
                if use.has(base):
                    derivative = read_saved(consumer, consumer_name, index, step, sympy.diff(use, variable))
                    term = _settled(sympy.Sum(derivative, *limits) if limits else derivative, spec, indices, shape)
                    if derivative.has(sympy.exp) and isinstance(step, sympy.log) and REGISTRY[consumer.op].saves_result:
                        # As logsumexp's backward computes exp(x - y): one exponential of the difference.
                        term = sympy.powsimp(term, combine="exp")
                    terms.append(mark_kernel(consumer, term, "backward"))
            if seed.has(base):
                terms.append(_settled(sympy.diff(seed, variable), spec, indices, shape))
        adjoint = sympy.Add(*terms)
        if adjoint.has(sympy.Derivative):
            raise NotImplementedError(f"sympy left an unevaluated derivative in ∂o/∂{name}: {adjoint}")
        adjoints[name] = Tensor(adjoint, indices, shape)
    return adjoints


def read_saved(node: Node, name: str, index: tuple, step: sympy.Expr, derivative: sympy.Expr) -> sympy.Expr:
    """A ``derivative`` of ``node``'s ``step`` at ``index``, reading the node's own result
    (named ``name``) where torch's backward reads it from what the forward saved (tanh' as
    1 - y**2, logsumexp's as exp(x - y)): the allowance's model then gives it the result's
    rounding in the stored dtype. An elementwise op's step is one function of its operands; a
    reduction read so takes the log of a sum."""
    op = REGISTRY[node.op] if isinstance(node, Apply) else None
    if op is None or not op.saves_result or step.is_Atom:
        return derivative
    result = variable_symbol(name, node.shape, {"real": True}, index)
    if op.kind == "elementwise":
        return derivative.subs(step, result)
    if isinstance(step, sympy.log):  # logsumexp: the sum of exponentials is exp of its result
        return derivative.subs(step.args[0], sympy.exp(result))
    if op.saved_exp is not None:  # softmax: each exponential of its row is its result times the row's sum
        return _exponentials_read_saved(derivative, step, op.saved_exp,
                                        lambda at: variable_symbol(name, node.shape, {"real": True}, at))
    return derivative


def _exponentials_read_saved(derivative: sympy.Expr, step: sympy.Expr, saved_exp, result_at) -> sympy.Expr:
    """``derivative`` of an op along an axis whose step holds the sum of its row's exponentials
    (softmax, log_softmax), with each exponential of an element of that row written as
    ``saved_exp(the result there, the sum)``: what the backward reads from the saved result."""
    (total,) = [s for s in step.atoms(sympy.Sum) if isinstance(s.function, sympy.exp)]
    (along, _, _), element = total.limits[0], total.function.args[0]
    axis = element.indices.index(along)

    def in_row(expr) -> bool:
        if not (isinstance(expr, sympy.exp) and isinstance(expr.args[0], sympy.Indexed)):
            return False
        at = expr.args[0]
        return at.base == element.base and all(a == b for k, (a, b) in enumerate(zip(at.indices, element.indices))
                                               if k != axis)

    held = sympy.Dummy("total")  # the sums themselves keep their exponentials
    read = derivative.xreplace({total: held}).replace(in_row, lambda e: saved_exp(result_at(e.args[0].indices), held))
    # The row's sum, a factor of every term of a sum over the row, cancels as a whole.
    read = read.replace(lambda e: isinstance(e, sympy.Sum) and e.has(held), factor_sum)
    return read.xreplace({held: total})


def mark_kernel(node: Node, term: sympy.Expr, computation: str) -> sympy.Expr:
    """``term``, marked as computed by ``node``'s op's kernel for ``computation`` ("value",
    "backward" or "forward"): the allowance's model reads the op's facts there."""
    if not isinstance(node, Apply) or term.is_Number:
        return term
    return kernel_of(node.op, computation)(term)


def tangent_name(input_name: str) -> str:
    """The name under which the reference receives the tangent of an input (forward mode)."""
    return TANGENT_PREFIX + input_name


def directional_derivative(formula: Tensor, spec: Spec, moving: dict | None = None) -> Tensor:
    """d/dε of ``formula`` with every input x moved to x + ε·t_x, at ε = 0: a JVP when the
    formula is the output, a Hessian-vector product when it is a gradient. sympy.diff does it.
    ``moving`` (name -> node) moves those symbols instead of the inputs."""
    epsilon = sympy.Dummy("epsilon", real=True)
    moved_inputs = {name: node for name, node in spec.inputs.items() if not node.data}  # data has no tangent
    shifts = {}
    for name, node in (moved_inputs if moving is None else moving).items():
        if node.shape:
            shifts[name] = sympy.IndexedBase(tangent_name(name), real=True)
        else:
            assumptions = node.domain.sympy_assumptions() if isinstance(node, Input) else {"real": True}
            shifts[sympy.Symbol(name, **assumptions)] = sympy.Symbol(tangent_name(name), real=True)
    moved = _moved(formula.expr, shifts, epsilon, {})
    ranges = index_ranges(formula.indices, formula.shape)
    derivative = sympy.diff(moved, epsilon).xreplace({epsilon: 0})
    return Tensor(settle(derivative, ranges), formula.indices, formula.shape)


def _moved(expr, shifts: dict, epsilon, memo: dict):
    """``expr`` with each variable of ``shifts`` (a scalar symbol -> its tangent symbol, or an
    array's name -> its tangent base) moved by epsilon times its tangent. An index stays put,
    as an integer does (sympy's derivative of y[argmax(x)] would be nan if it moved)."""
    if expr in memo:
        return memo[expr]
    if isinstance(expr, sympy.Indexed):
        tangent = shifts.get(expr.base.name)
        result = expr if tangent is None else expr + epsilon * tangent[expr.indices]
    elif isinstance(expr, sympy.Symbol):
        tangent = shifts.get(expr)
        result = expr if tangent is None else expr + epsilon * tangent
    elif not expr.args:
        result = expr
    else:
        result = expr.func(*(_moved(a, shifts, epsilon, memo) for a in expr.args))
    memo[expr] = result
    return result


def forward_chain(spec: Spec, tracked: dict, sizes: dict | None = None) -> dict:
    """The tangent of each node of ``tracked`` (node -> name) that depends on an input, one op
    at a time, as forward mode runs: the directional derivative of its step, its operands
    moved along their own tangents (symbols named by ``tangent_name``)."""
    operands = {node: name for node, name in tracked.items() if not isinstance(node, Input)}
    tangents = {}
    for node, name in operands.items():
        if not depends_on_inputs(node):
            continue
        others = {n: m for n, m in operands.items() if n is not node}
        step = SympyLowering(spec, others, sizes).tensor(node)
        moving = {m: n for n, m in tracked.items() if n is not node and depends_on_inputs(n)}
        tangent = directional_derivative(step, spec, moving)
        tangents[name] = Tensor(mark_kernel(node, read_saved(node, name, step.indices, step.expr, tangent.expr),
                                                "forward"), tangent.indices, tangent.shape)
    return tangents


def second_derivative(gradient: Tensor, spec: Spec, wrt: str, lowering: SympyLowering) -> Tensor:
    """∂/∂wrt of a gradient in the inputs: the Hessian, with wrt's indices after the gradient's."""
    node = spec.inputs[wrt]
    extra = lowering.free_indices(len(gradient.indices) + node.rank)[len(gradient.indices):]
    variable = variable_symbol(wrt, node.shape, node.domain.sympy_assumptions(), extra)
    shape = gradient.shape + lowering.shape(node)
    indices = gradient.indices + extra
    ranges = index_ranges(indices, shape)
    return Tensor(settle(sympy.diff(gradient.expr, variable), ranges), indices, shape)


def _scalar_output(lowering: SympyLowering, output_node: Node) -> sympy.Expr:
    """o itself when scalar, else the sum of o against a cotangent, as backward(cotangent) sees it."""
    if not output_node.shape:
        return lowering.element(output_node, ())
    cotangent = sympy.IndexedBase(COTANGENT, real=True)
    limits, index = [], []
    for size in lowering.shape(output_node):
        symbol, limit = lowering.fresh_index(size)
        index.append(symbol)
        limits.append(limit)
    return sympy.Sum(cotangent[tuple(index)] * lowering.element(output_node, tuple(index)), *limits)


def prove_equal(derivative: Tensor, claimed: sympy.Expr, spec: Spec | None = None) -> bool:
    """True when sympy shows ``derivative == claimed`` for every size and index in range."""
    return why_unproved(derivative, claimed, spec) is None


def why_unproved(derivative: Tensor, claimed: sympy.Expr, spec: Spec | None = None) -> str | None:
    """None when sympy shows ``derivative == claimed`` for every size and index in range, else
    why it did not. With ``spec``, a claim that differs at a sample point inside its inputs'
    domains is not sent to the prover: simplify spends its whole time budget failing to prove
    what is false."""
    if spec is not None and _differ_at_a_sample(derivative.expr, claimed, spec,
                                                dict(zip(derivative.indices, derivative.shape))):
        return "the two sides differ at a sample point"
    ranges = index_ranges(derivative.indices, derivative.shape)
    difference = _canonical_indices(settle(elementary(derivative.expr - claimed), ranges))
    operations = sympy.count_ops(difference)
    if operations > MAX_PROOF_OPS:  # simplify can take minutes on large formulas
        return f"the difference has {operations} operations, more than the {MAX_PROOF_OPS} sympy is given to simplify"
    try:
        with time_limit(PROOF_SECONDS):
            if sympy.simplify(difference) == 0:
                return None
    except OutOfTime:
        return f"sympy's simplify ran past its {PROOF_SECONDS:g} s"
    except StopIteration:  # sympy 1.14's sum_simplify raises it on some nested sums
        return "sympy's sum_simplify failed on the nested sums"
    return "sympy's simplify did not reduce the difference to 0"


class OutOfTime(Exception):
    """The sympy work ran past its time budget."""


class _Expired(BaseException):
    """A time limit's expiry on its way to the end of its block: a BaseException, so that a
    handler inside the block (one catching OutOfTime for an inner limit) lets it pass."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``OutOfTime`` in the block after ``seconds``. Limits nest: an outer one that
    expires inside an inner one ends its own block, whatever the inner block catches.

    In the main thread the limit is SIGALRM, which also stops long integer arithmetic in C
    (CPython checks for signals there). An outer alarm (pytest-timeout's, say) keeps its time:
    it fires at its own moment, by its own handler, and is set again on the way out. Other
    threads get no signals: there a timer thread raises the expiry in the block's thread,
    at its next bytecode."""
    expired = type("_Expired", (_Expired,), {})  # this limit's own
    by_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    try:
        with (_alarm if by_alarm else _timer)(seconds, expired):
            yield
    except expired:
        raise OutOfTime(f"over {seconds} s") from None


@contextlib.contextmanager
def _alarm(seconds: float, expired: type):
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()
    outer_deadline = started + outer_delay if outer_delay else None
    outer_fired = False

    def expire(signum, frame):
        nonlocal outer_fired
        if (not outer_fired and outer_deadline is not None and time.monotonic() >= outer_deadline
                and callable(previous)):
            outer_fired = True
            if time.monotonic() < started + seconds:  # ours is still to come
                signal.setitimer(signal.ITIMER_REAL, started + seconds - time.monotonic())
            return previous(signum, frame)
        raise expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_delay) if outer_delay else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_deadline is not None:
            if not outer_fired:
                signal.setitimer(signal.ITIMER_REAL, max(outer_deadline - time.monotonic(), 1e-6), outer_interval)
            elif outer_interval:
                signal.setitimer(signal.ITIMER_REAL, outer_interval, outer_interval)


@contextlib.contextmanager
def _timer(seconds: float, expired: type):
    target = threading.get_ident()
    lock = threading.Lock()
    armed, fired = [True], [False]

    def fire():
        with lock:
            if armed[0]:
                fired[0] = True
                _raise_in(target, expired)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            armed[0] = False
            timer.cancel()
            if fired[0]:
                _raise_in(target, None)  # withdraw it where it is still pending: the block is over


def _raise_in(thread_id: int, exception) -> None:
    """Raise ``exception`` (a class) in the thread at its next bytecode; None withdraws one pending."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               None if exception is None else ctypes.py_object(exception))


def _canonical_indices(expr, depth: int = 0):
    """Rename summation indices by nesting depth, so that equal sums look equal to simplify."""
    if isinstance(expr, ExprWithLimits):
        renamed = {index: index_symbol(f"_c{depth}_{k}") for k, (index, _, _) in enumerate(expr.limits)}
        limits = [(renamed[index], low, high) for index, low, high in expr.limits]
        return type(expr)(_canonical_indices(expr.function.xreplace(renamed), depth + 1), *limits)
    if not expr.args or isinstance(expr, (sympy.Indexed, sympy.Symbol)):
        return expr
    return expr.func(*(_canonical_indices(a, depth) for a in expr.args))
