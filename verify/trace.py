"""A torch reference -> a spec: the function traced by torch's own tracer, written in the spec language.

``make_fx`` records the function at the aten level on fake tensors, with symbolic sizes: a
dimension that stays symbolic becomes a size symbol, so what is derived holds for every size.
Each aten op is written as the registry spells it, and the text is parsed like any spec file,
so a traced spec is no more trusted than a typed one: its derivatives still come from sympy.

Casts (``.float()``, ``.to(x.dtype)``) are not math: the spec records them as a comment, and
the widest one tells ``check_function`` the compute dtype. A construct with no spelling (an
aten op outside the registry, a condition on a size, data-dependent control flow) is a
``SpecError`` at the user's line; no spec is written for it.
"""

from __future__ import annotations

import inspect
import math
import operator
import traceback
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import sympy
import torch

from .binding import spec_name
from .errors import SpecError
from .ir import DOMAINS, Spec
from .spec import RESERVED, parse

END = 2**63 - 1  # aten's slice end for "to the end"
SIZE_NAMES = ("n", "m", "k", "p", "q", "r", "h", "d", "c", "l", "j", "g")
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}

UNARY = ("abs", "exp", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "asin", "acos", "atan",
         "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sigmoid", "sqrt", "rsqrt", "reciprocal", "erf",
         "erfc", "lgamma", "digamma", "sign", "relu", "silu", "mish", "floor", "ceil", "trunc", "round", "sinc")
BINARY = ("atan2", "hypot", "maximum", "minimum", "xlogy")
ARITHMETIC = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
# How tightly an expression's text binds, as Python parses it: an operand binding less tightly
# than its place needs is parenthesized, so the spec's tree (and its roundings) is the code's.
SUM, PRODUCT, NEGATION, POWER, ATOM = 1, 2, 3, 4, 5
COMPARISONS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
IDENTITIES = ("clone", "alias", "contiguous", "lift_fresh_copy", "view_as")
CASTS = ("_to_copy", "to", "convert_element_type", "type_as")
RESHAPES = ("view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten", "expand_as")
REDUCTIONS = ("sum", "mean", "prod", "amax", "amin", "logsumexp")
AXISWISE = {"_softmax": "softmax", "_log_softmax": "log_softmax", "softmax": "softmax",
            "log_softmax": "log_softmax", "cumsum": "cumsum", "cumprod": "cumprod", "logcumsumexp": "logcumsumexp"}


@dataclass(frozen=True)
class Traced:
    """A traced reference: its spec, and the dtype its casts compute in (None without casts)."""

    spec: Spec
    compute_dtype: torch.dtype | None = None

    @property
    def text(self) -> str:
        return self.spec.source


@dataclass
class _Value:
    """A traced node in spec text: ``kind`` is "real", "integer", "condition" (inlined in a
    where), "size" (an expression in the size symbols) or "number"; ``known`` is a condition
    whose truth the inputs' domains decide; ``broadcast`` marks an ``expand`` (only
    elementwise ops may read it, as they broadcast anyway)."""

    text: str
    rank: int = 0
    kind: str = "real"
    precedence: int = ATOM
    known: bool | None = None
    broadcast: bool = False


@dataclass
class _Tuple:
    """A multi-output aten op: ``parts(i)`` writes output ``i`` on demand."""

    parts: object


@dataclass
class _Tracer:
    graph: torch.fx.GraphModule
    names: list
    domains: dict
    size_names: dict  # sympy symbol -> name
    shape_env: object
    statements: list = field(default_factory=list)
    values: dict = field(default_factory=dict)
    used_names: set = field(default_factory=set)
    integer_ranges: dict = field(default_factory=dict)  # an integer input -> the size its values index
    casts: list = field(default_factory=list)
    line: str | None = None  # the user's line of the node being written
    commented: str | None = None  # the line the last comment named

    # -- text ----------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        base = base.lstrip("_") or "v"
        name = base + "_" if base in RESERVED else base
        k = 1
        while name in self.used_names:
            name, k = f"{base}_v{k}", k + 1
        self.used_names.add(name)
        return name

    def emit(self, base: str, text: str, rank: int) -> _Value:
        name = self.fresh(base)
        # The user's line, once for the statements it wrote.
        comment = f"  # {self.line}" if self.line and self.line != self.commented else ""
        self.commented = self.line
        self.statements.append(f"{name} = {text}{comment}")
        return _Value(name, rank)

    def result(self, node, text: str, rank: int, precedence: int = ATOM) -> _Value:
        """``node``'s value: written inline into its one consumer, or named where several read
        it (each named node is checked, value and gradient, so the spec reads as the code does
        without a check per step)."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is not operator.getitem:
            return _Value(text, rank, precedence=precedence)
        return self.emit(node.name, text, rank)

    def refuse(self, message: str) -> SpecError:
        where = f" (at {self.line})" if self.line else ""
        return SpecError(f"cannot trace this into a spec: {message}{where}")

    def size(self, value) -> _Value:
        """A size (an int or a SymInt) as an expression in the size symbols."""
        expr = value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(int(value))
        expr = self.shape_env.replace(expr) if self.shape_env is not None else expr
        precedence = ATOM if expr.is_Atom else SUM if isinstance(expr, sympy.Add) else PRODUCT
        return _Value(self.size_text(expr), kind="size", precedence=precedence)

    def size_text(self, expr) -> str:
        if expr.is_Integer:
            return str(int(expr))
        if expr.is_Symbol:
            return self.size_names[expr]
        if type(expr).__name__ == "FloorDiv" and expr.args[1].is_Integer and expr.args[1] > 0:
            numerator = self.size_text(expr.args[0])
            return f"({numerator if expr.args[0].is_Atom else f'({numerator})'} // {int(expr.args[1])})"
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            parts = [self.size_text(a) for a in expr.args]
            return f" {'+' if isinstance(expr, sympy.Add) else '*'} ".join(
                p if isinstance(expr, sympy.Add) or a.is_Atom else f"({p})" for p, a in zip(parts, expr.args))
        raise self.refuse(f"the size {expr} has no spelling in the spec language (only +, -, * and // of sizes)")

    def shape(self, node) -> tuple:
        return tuple(self.size(d).text for d in node.meta["val"].shape)

    def operand(self, value, elementwise: bool = False, tighter: int = 0) -> str:
        """``value`` as an operand: parenthesized where it binds less tightly than ``tighter``
        (0 for a call's argument)."""
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            value = self.symbolic(value)
        elif isinstance(value, bool):
            raise self.refuse("a boolean constant in arithmetic")
        elif isinstance(value, (int, float)):
            value = constant_value(value)
        if not isinstance(value, _Value):
            raise self.refuse(f"an operand of type {type(value).__name__}")
        if value.broadcast and not elementwise:
            raise self.refuse("an expand read by an op that is not elementwise")
        if value.kind == "condition":
            return self.as_real(value)
        return value.text if value.precedence >= tighter else f"({value.text})"

    def as_real(self, condition: _Value) -> str:
        if condition.known is not None:
            return str(int(condition.known))
        return f"where({condition.text}, 1, 0)"

    def symbolic(self, value) -> _Value:
        if isinstance(value, torch.SymInt):
            return self.size(value)
        raise self.refuse("a float computed from sizes")

    # -- the graph -----------------------------------------------------------------------

    def run(self) -> str:
        placeholders = [n for n in self.graph.graph.nodes if n.op == "placeholder"]
        for node, name in zip(placeholders, self.names):
            self.used_names.add(name)
            value = node.meta["val"]
            kind = "real" if value.dtype in FLOATS else "integer"
            if value.dtype == torch.bool:
                raise SpecError(f"cannot trace this into a spec: the boolean input {name} (pass a float mask, or "
                                "an integer one with domains=)")
            self.values[node] = _Value(name, value.dim(), kind)
        self.infer_integer_ranges()
        output = None
        for node in self.graph.graph.nodes:
            if node.op == "call_function":
                self.line = _user_line(node)
                self.values[node] = self.call(node)
            elif node.op == "output":
                output = node.args[0]
            elif node.op == "get_attr":
                self.values[node] = self.constant(getattr(self.graph, node.target), node.target)
        if not isinstance(output, torch.fx.Node):
            raise SpecError("cannot trace this into a spec: the function must return one tensor")
        result = self.values[output]
        if not isinstance(result, _Value) or result.kind != "real":
            raise SpecError("cannot trace this into a spec: the function must return one real tensor")
        if not self.statements or not self.statements[-1].startswith(f"{result.text} = "):
            self.line = None
            self.emit("out", result.text, result.rank)
        return "\n".join(self.declarations(placeholders) + self.statements)

    def constant(self, tensor, name: str) -> _Value:
        """A scalar tensor the function made (torch.tensor(0.)) is a number; a larger one is data
        the spec cannot hold."""
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 0:
            raise self.refuse(f"a tensor constant ({name}, shape {tuple(tensor.shape)}) captured by the "
                              "function: pass it as an input")
        if tensor.dtype == torch.bool:
            return _Value(str(bool(tensor)), kind="condition", known=bool(tensor))
        return constant_value(int(tensor) if not tensor.is_floating_point() else float(tensor))

    def infer_integer_ranges(self) -> None:
        """An integer input that picks classes or rows ranges over them (0 up to that size)."""
        picked = {"nll_loss_forward": ("target", 0, 1), "embedding": ("indices", 0, 0), "index": ("indices", 0, 0)}
        for node in self.graph.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                    or node.target._opname not in picked:
                continue
            key, source, axis = picked[node.target._opname]
            arguments = node.normalized_arguments(self.graph, normalize_to_only_use_kwargs=True).kwargs
            index = arguments[key][0] if isinstance(arguments[key], (list, tuple)) else arguments[key]
            if isinstance(index, torch.fx.Node) and index.op == "placeholder" and index in self.values:
                holder = node.args[source]
                self.integer_ranges.setdefault(self.values[index].text, self.shape(holder)[axis])

    def declarations(self, placeholders) -> list:
        lines = []
        for node, name in zip(placeholders, self.names):
            value = node.meta["val"]
            dims = ", ".join(self.shape(node))
            lines.append(f"{name}: {self.domain(name, value)}" + (f"[{dims}]" if dims else ""))
        return lines

    def domain(self, name: str, value) -> str:
        given = self.domains.get(name)
        if value.dtype in FLOATS:
            if given is None or given in DOMAINS:
                return given or "Real"
            return f"Interval({number(given[0])}, {number(given[1])})"
        if given is not None:
            return f"Integer({int(given[0])}, {int(given[1])})"
        if name in self.integer_ranges:
            return f"Integer(0, {self.integer_ranges[name]})"
        raise SpecError(f"cannot trace this into a spec: give the integer input {name} its range, "
                        f"domains={{{name!r}: (low, high)}} (low <= {name} < high)")

    def call(self, node):
        target = node.target
        if target is operator.getitem:
            owner, index = node.args
            parts = self.values[owner]
            if not isinstance(parts, _Tuple):
                raise self.refuse("indexing a value that is no tuple of tensors")
            return parts.parts(index)
        if target in SIZE_ARITHMETIC:
            return self.size_arithmetic(node)
        if not isinstance(target, torch._ops.OpOverload):
            raise self.refuse(f"the call {getattr(target, '__name__', target)}")
        try:
            arguments = node.normalized_arguments(self.graph, normalize_to_only_use_kwargs=True).kwargs
        except Exception:  # noqa: BLE001 - an op whose schema fx cannot bind is an op we cannot write
            arguments = None
        if arguments is None:
            raise self.refuse(f"aten.{target._opname} ({target}) has no counterpart in the registry")
        arguments = {k: self.values.get(v, v) if isinstance(v, torch.fx.Node) else _mapped(v, self.values)
                     for k, v in arguments.items()}
        name = target._opname
        method = getattr(self, "op_" + name.lstrip("_"), None)
        if method is None and name not in _GENERIC:
            raise self.refuse(f"aten.{name} ({target}) has no counterpart in the registry")
        try:
            return method(node, arguments) if method is not None else _GENERIC[name](self, node, name, arguments)
        except SpecError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            # An overload whose arguments the registry's spelling does not cover (a Scalar
            # first operand, a keyword it lacks): refused, never a traceback.
            raise self.refuse(f"{target} with these arguments ({type(error).__name__}: {error})") from None

    # -- sizes ---------------------------------------------------------------------------

    def op_sym_size(self, node, a):
        return self.size(node.meta["val"])

    def size_arithmetic(self, node):
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) or type(value) is int:
            return self.size(value)
        if node.target in (operator.truediv, torch.sym_float):
            args = [self.values.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
            if node.target is torch.sym_float:
                return _Value(args[0].text, kind="number", precedence=args[0].precedence)
            left, right = self.operand(args[0], tighter=PRODUCT), self.operand(args[1], tighter=POWER)
            return _Value(f"{left} / {right}", kind="number", precedence=PRODUCT)
        raise self.refuse(f"the size arithmetic {node.target}")

    # -- elementwise ---------------------------------------------------------------------

    def rank(self, node) -> int:
        return node.meta["val"].dim()

    def op_neg(self, node, a):
        return self.result(node, f"-{self.operand(a['input'], True, POWER)}", self.rank(node), NEGATION)

    def op_pow(self, node, a):
        base = a.get("input", a.get("self"))
        text = f"{self.operand(base, True, ATOM)}**{self.operand(a['exponent'], True, NEGATION)}"
        return self.result(node, text, self.rank(node), POWER)

    def op_rsub(self, node, a):
        other = self.scaled(a["other"], a.get("alpha", 1), SUM)
        return self.result(node, f"{other} - {self.operand(a['input'], True, PRODUCT)}", self.rank(node), SUM)

    def scaled(self, value, alpha, tighter: int) -> str:
        if alpha == 1:
            return self.operand(value, True, tighter)
        return f"{self.operand(alpha, tighter=PRODUCT)} * {self.operand(value, True, POWER)}"

    def arithmetic(self, node, name, a):
        left, right = a["input"], a["other"]
        if name == "div" and a.get("rounding_mode") is not None:
            raise self.refuse(f"division with rounding_mode={a['rounding_mode']!r}")
        # Left-associative: the left operand may bind as loosely as the operator, the right may not.
        level = SUM if name in ("add", "sub") else PRODUCT
        right_text = self.scaled(right, a.get("alpha", 1), level + 1) if level == SUM else \
            self.operand(right, True, level + 1)
        text = f"{self.operand(left, True, level)} {ARITHMETIC[name]} {right_text}"
        if all(not isinstance(v, _Value) or v.kind in ("size", "number") for v in (left, right)):
            return _Value(text, kind="number", precedence=level)
        return self.result(node, text, self.rank(node), level)

    def unary(self, node, name, a):
        return self.result(node, f"{name}({self.operand(a['input'], True)})", self.rank(node))

    def binary(self, node, name, a):
        other = a.get("other")
        return self.result(node, f"{name}({self.operand(a['input'], True)}, {self.operand(other, True)})",
                         self.rank(node))

    def op_gelu(self, node, a):
        x = self.operand(a["input"], True, ATOM)
        if a.get("approximate", "none") == "none":
            return self.result(node, f"gelu({x})", self.rank(node))
        return self.result(node, f"{x} * (1 + tanh(sqrt(2 / pi) * ({x} + 0.044715 * {x}**3))) / 2",
                           self.rank(node), PRODUCT)

    def op_elu(self, node, a):
        x = self.operand(a["input"], True)
        if (a.get("alpha", 1), a.get("scale", 1), a.get("input_scale", 1)) == (1, 1, 1):
            return self.result(node, f"elu({x})", self.rank(node))
        raise self.refuse("elu with alpha, scale or input_scale other than 1")

    def op_softplus(self, node, a):
        if (a.get("beta", 1), a.get("threshold", 20)) != (1, 20):
            raise self.refuse("softplus with beta or threshold other than 1 and 20")
        return self.result(node, f"softplus({self.operand(a['input'], True)})", self.rank(node))

    def op_leaky_relu(self, node, a):
        x = self.operand(a["input"], True, POWER)
        slope = self.operand(a.get("negative_slope", 0.01), tighter=PRODUCT)
        return self.result(node, f"where({x} > 0, {x}, {slope} * {x})",
                         self.rank(node))

    def op_log_sigmoid_forward(self, node, a):
        x = self.operand(a["input"], True)
        rank = self.rank(node.args[0])
        return _Tuple(lambda i: self.result(node, f"logsigmoid({x})", rank) if i == 0 else self.unwritable(i))

    def unwritable(self, index):
        raise self.refuse(f"output {index} of a multi-output op (only its main result has a spelling)")

    def op_clamp(self, node, a):
        x = self.operand(a["input"], True)
        low, high = a.get("min"), a.get("max")
        if low is not None and high is not None:
            return self.result(node, f"clamp({x}, {self.operand(low, True)}, {self.operand(high, True)})",
                             self.rank(node))
        # One bound: the gradient passes at the bound, as torch's clamp passes it.
        if low is not None:
            low = self.operand(low, True)
            return self.result(node, f"where({x} >= {low}, {x}, {low})", self.rank(node))
        high = self.operand(high, True)
        return self.result(node, f"where({x} <= {high}, {x}, {high})", self.rank(node))

    def op_clamp_min(self, node, a):
        return self.op_clamp(node, {"input": a["input"], "min": a["min"]})

    def op_clamp_max(self, node, a):
        return self.op_clamp(node, {"input": a["input"], "max": a["max"]})

    # -- conditions ----------------------------------------------------------------------

    def comparison(self, node, name, a):
        left, right = a["input"], a["other"]
        known = self.decided(left, right, name)
        text = f"{self.operand(left, True, SUM)} {COMPARISONS[name]} {self.operand(right, True, SUM)}"
        return _Value(text, self.rank(node), "condition", precedence=0, known=known)

    def decided(self, left, right, name):
        """The truth of ``integer input <op> constant`` where the input's range decides it: its
        ``domains`` entry, or the size it indexes (0 up, for a negative constant)."""
        if not (isinstance(left, _Value) and left.kind == "integer" and isinstance(right, int)
                and not isinstance(right, bool)):
            return None
        if left.text in self.domains:
            low, high = (int(b) for b in self.domains[left.text])
        elif left.text in self.integer_ranges and right < 0:
            low, high = 0, right + 2**62  # below every index: only the lower end matters
        else:
            return None
        if name in ("eq", "ne"):
            return None if low <= right < high else name == "ne"
        outcomes = {_COMPARE[name](k, right) for k in (low, high - 1)}
        return outcomes.pop() if len(outcomes) == 1 else None

    def condition(self, value) -> _Value:
        if not isinstance(value, _Value) or value.kind != "condition":
            raise self.refuse("a condition that is not a comparison of tensors")
        return value

    def op_logical_not(self, node, a):
        c = self.condition(a["input"])
        return _Value(f"not ({c.text})", c.rank, "condition", 0, None if c.known is None else not c.known)

    op_bitwise_not = op_logical_not

    def joined(self, node, a, word, combine):
        x, y = self.condition(a["input"]), self.condition(a["other"])
        known = combine(x.known, y.known)
        return _Value(f"({x.text}) {word} ({y.text})", self.rank(node), "condition", 0, known)

    def op_logical_and(self, node, a):
        return self.joined(node, a, "and", lambda p, q: False if False in (p, q) else (True if p and q else None))

    def op_logical_or(self, node, a):
        return self.joined(node, a, "or", lambda p, q: True if True in (p, q) else (False if (p, q) == (False, False)
                                                                                     else None))

    op_bitwise_and, op_bitwise_or = op_logical_and, op_logical_or

    def op_where(self, node, a):
        c = self.condition(a["condition"])
        x, y = a["input"], a["other"]
        if c.known is not None:
            chosen = x if c.known else y
            chosen = chosen if isinstance(chosen, _Value) else constant_value(chosen)
            return self.result(node, self.operand(chosen, True), self.rank(node), chosen.precedence)
        return self.result(node, f"where({c.text}, {self.operand(x, True)}, {self.operand(y, True)})",
                         self.rank(node))

    def op_masked_fill(self, node, a):
        return self.op_where(node, {"condition": a["mask"], "input": a["value"], "other": a["input"]})

    op_masked_fill_ = op_masked_fill

    # -- reductions and axiswise ops -----------------------------------------------------

    def axes(self, dims, rank: int) -> str | None:
        if dims is None or dims == []:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        normal = [d % rank if rank else 0 for d in dims]
        return str(normal[0]) if len(normal) == 1 else f"({', '.join(map(str, normal))})"

    def reduction(self, node, name, a):
        x = a["input"]
        if isinstance(x, _Value) and x.kind == "condition":
            return self.count(node, x, a)
        axis = self.axes(a.get("dim"), x.rank)
        keyword = (f", axis={axis}" if axis is not None else "") + (", keepdims=True" if a.get("keepdim") else "")
        return self.result(node, f"{name}({self.operand(x)}{keyword})", self.rank(node))

    def count(self, node, condition, a):
        """The sum of a condition: how many elements hold it."""
        if condition.known is False:
            return _Value("0", kind="number")
        if condition.known is True and a.get("dim") in (None, []):
            sizes = self.shape(node.args[0])
            return _Value(" * ".join(sizes) or "1", kind="number", precedence=PRODUCT if len(sizes) > 1 else ATOM)
        return self.reduction(node, "sum", {**a, "input": _Value(self.as_real(condition), condition.rank)})

    def spread(self, node, name, a):
        x = a["input"]
        correction = a.get("correction")
        correction = 1 if correction is None else correction
        axis = self.axes(a.get("dim"), x.rank)
        keyword = (f", axis={axis}" if axis is not None else "") + (", keepdims=True" if a.get("keepdim") else "")
        if correction == 1:
            return self.result(node, f"{name}({self.operand(x)}{keyword})", self.rank(node))
        if correction != 0:
            raise self.refuse(f"{name} with correction={correction}")
        mean = self.emit("mu", f"mean({self.operand(x)}" + (f", axis={axis}" if axis else "") + ", keepdims=True)",
                         x.rank)
        variance = f"mean(({self.operand(x, tighter=SUM)} - {mean.text})**2{keyword})"
        return self.result(node, variance if name == "var" else f"sqrt({variance})", self.rank(node))

    def op_linalg_vector_norm(self, node, a):
        x = a["input"]
        axis = self.axes(a.get("dim"), x.rank)
        order = a.get("ord", 2)
        keyword = (f", axis={axis}" if axis is not None else "") + (", keepdims=True" if a.get("keepdim") else "")
        p = "" if order == 2 else f", p={'inf' if order == float('inf') else number(order)}"
        return self.result(node, f"norm({self.operand(x)}{p}{keyword})", self.rank(node))

    def axiswise(self, node, name, a):
        x = a["input"]
        return self.result(node, f"{AXISWISE[name]}({self.operand(x)}, axis={a['dim'] % max(x.rank, 1)})",
                         self.rank(node))

    # -- structure -----------------------------------------------------------------------

    def matmul(self, node, name, a):
        left, right = a["input"], a.get("mat2", a.get("other"))
        return self.result(node, f"{self.operand(left, tighter=PRODUCT)} @ {self.operand(right, tighter=POWER)}",
                           self.rank(node), PRODUCT)

    def op_addmm(self, node, a):
        if (a.get("beta", 1), a.get("alpha", 1)) != (1, 1):
            raise self.refuse("addmm with beta or alpha other than 1")
        product = f"{self.operand(a['mat1'], tighter=PRODUCT)} @ {self.operand(a['mat2'], tighter=POWER)}"
        return self.result(node, f"{product} + {self.operand(a['input'], True, PRODUCT)}", self.rank(node), SUM)

    def op_t(self, node, a):
        x = a["input"]
        return x if x.rank < 2 else self.result(node, f"{self.operand(x, tighter=ATOM)}.T", 2)

    def op_transpose(self, node, a):
        x = a["input"]
        first, second = sorted((a["dim0"] % x.rank, a["dim1"] % x.rank))
        if first == second:
            return x
        if x.rank == 2:
            return self.result(node, f"{self.operand(x, tighter=ATOM)}.T", 2)
        return self.result(node, f"swapaxes({self.operand(x)}, {first}, {second})", x.rank)

    def op_permute(self, node, a):
        x = a["input"]
        axes = [d % x.rank for d in a["dims"]]
        if axes == sorted(axes):
            return x
        return self.result(node, f"permute({self.operand(x)}, ({', '.join(map(str, axes))}{',' * (len(axes) == 1)}))",
                         x.rank)

    def reshape(self, node, name, a):
        x = a["input"]
        source, shape = self.shape(node.args[0]), self.shape(node)
        if source == shape:
            return x
        symbolic = [k for k, size in enumerate(shape) if not size.lstrip("-").isdigit()]
        if len(symbolic) > 1:
            raise self.refuse(f"a reshape to ({', '.join(shape)}): the spec's reshape takes constant sizes, and -1 "
                              "for one of them")
        # The one symbolic size is what the others leave: -1.
        shape = tuple("-1" if k in symbolic else size for k, size in enumerate(shape))
        text = f"({', '.join(shape)}{',' * (len(shape) == 1)})"
        return self.result(node, f"reshape({self.operand(x)}, shape={text})", len(shape))

    def op_expand(self, node, a):
        x = a["input"]
        if self.shape(node.args[0]) == self.shape(node):
            return x
        return _Value(x.text, self.rank(node), x.kind, x.precedence, broadcast=True)

    def op_detach(self, node, a):
        if a["input"].kind in ("number", "size", "condition"):
            return a["input"]  # no gradient to stop
        return self.result(node, f"stop_gradient({self.operand(a['input'])})", self.rank(node))

    def identity(self, node, name, a):
        return a["input"]

    def cast(self, node, name, a):
        x = a["input"]
        source, target = node.args[0].meta["val"].dtype, node.meta["val"].dtype
        if source != target:
            if isinstance(x, _Value) and x.kind == "condition":
                return self.result(node, self.as_real(x), self.rank(node))
            if source in FLOATS and target in FLOATS:
                self.casts.append((source, target, self.line))
            elif target not in FLOATS or source not in FLOATS + (torch.int64, torch.int32):
                raise self.refuse(f"a cast from {source} to {target}")
        return x

    def op_cat(self, node, a):
        tensors = a["tensors"]
        rank = self.rank(node)
        return self.result(node, f"concat({', '.join(self.operand(t) for t in tensors)}, axis={a['dim'] % rank})",
                         rank)

    def op_stack(self, node, a):
        tensors = a["tensors"]
        rank = self.rank(node)
        return self.result(node, f"stack({', '.join(self.operand(t) for t in tensors)}, axis={a['dim'] % rank})",
                         rank)

    def op_slice(self, node, a):
        x = a["input"]
        dim = a.get("dim", 0) % x.rank
        start, end, step = a.get("start") or 0, a.get("end"), a.get("step", 1)
        full = self.shape(node.args[0])[dim]
        start_text = "" if _is_zero(start) else self.size_or_int(start)
        end_text = "" if end is None or (type(end) is int and end >= END) else self.size_or_int(end)
        if end_text == full:
            end_text = ""
        if not start_text and not end_text and step == 1:
            return x
        bound = f"{start_text}:{end_text}" + (f":{step}" if step != 1 else "")
        return self.result(node, f"{self.operand(x, tighter=ATOM)}[{', '.join([':'] * dim + [bound])}]", x.rank)

    def size_or_int(self, value) -> str:
        if isinstance(value, _Value):
            return value.text
        if isinstance(value, torch.SymInt):
            return self.size(value).text
        return str(int(value))

    def op_select(self, node, a):
        x = a["input"]
        dim = a["dim"] % x.rank
        items = ", ".join([":"] * dim + [self.size_or_int(a["index"])])
        return self.result(node, f"{self.operand(x, tighter=ATOM)}[{items}]", x.rank - 1)

    def op_index(self, node, a):
        x, indices = a["input"], a["indices"]
        if len(indices) != 1 or not isinstance(indices[0], _Value) or indices[0].kind != "integer":
            raise self.refuse("indexing by anything but one integer tensor on the first axis")
        return self.result(node, f"{self.operand(x, tighter=ATOM)}[{indices[0].text}]", self.rank(node))

    def op_embedding(self, node, a):
        weight, indices = a["weight"], a["indices"]
        if a.get("padding_idx", -1) not in (-1, None):
            raise self.refuse("embedding with a padding_idx")
        return self.op_index(node, {"input": weight, "indices": [indices]})

    def op_nll_loss_forward(self, node, a):
        z, t = a["input"], a["target"]
        if a.get("weight") is not None or z.rank != 2:
            raise self.refuse("nll_loss with class weights, or an input that is not (batch, classes)")
        if self.decided(t, a["ignore_index"], "eq") is not False:
            raise self.refuse(f"ignore_index={a['ignore_index']} inside the target's range: the spec language "
                              "has no way to skip those targets")
        reduction = {0: "", 1: "mean", 2: "sum"}[a["reduction"]]
        picked = f"take({self.operand(z)}, {t.text})"
        batch = self.shape(node.args[0])[0]

        def part(index):
            if index == 0:
                return self.result(node, f"-{reduction}({picked})" if reduction else f"-{picked}",
                                   0 if reduction else 1, NEGATION)
            return _Value(batch, kind="size")

        return _Tuple(part)

    def op_native_layer_norm(self, node, a):
        x, weight, bias, eps = a["input"], a.get("weight"), a.get("bias"), a["eps"]
        count = len(a["normalized_shape"])
        axes = tuple(range(x.rank - count, x.rank))
        axis = str(axes[0]) if count == 1 else f"({', '.join(map(str, axes))})"
        written = {}

        def moments():
            if not written:
                written["mu"] = self.emit("mu", f"mean({self.operand(x)}, axis={axis}, keepdims=True)", x.rank)
                written["sigma2"] = self.emit("sigma2", f"mean(({self.operand(x)} - {written['mu'].text})**2, "
                                                        f"axis={axis}, keepdims=True)", x.rank)
            return written

        def part(index):
            w = moments()
            if index == 1:
                return w["mu"]
            if index == 2:
                return self.emit("rstd", f"1 / sqrt({w['sigma2'].text} + {number(eps)})", x.rank)
            text = f"({self.operand(x, tighter=SUM)} - {w['mu'].text}) / sqrt({w['sigma2'].text} + {number(eps)})"
            if weight is not None:
                text += f" * {self.operand(weight, True, POWER)}"
            if bias is not None:
                text += f" + {self.operand(bias, True, PRODUCT)}"
            return self.result(node, text, x.rank, SUM if bias is not None else PRODUCT)

        return _Tuple(part)

    def op_convolution(self, node, a):
        x, weight, bias = a["input"], a["weight"], a.get("bias")
        if a.get("transposed") or any(a.get("output_padding") or []):
            raise self.refuse("a transposed convolution")
        spatial = x.rank - 2
        if spatial not in (1, 2):
            raise self.refuse(f"a convolution over {spatial} dimensions")
        keywords = []
        for key in ("stride", "padding", "dilation"):
            values = list(a[key])
            default = 0 if key == "padding" else 1
            if any(v != default for v in values):
                keywords.append(f"{key}={values[0] if spatial == 1 else tuple(values)}")
        if a.get("groups", 1) != 1:
            keywords.append(f"groups={a['groups']}")
        text = f"conv{spatial}d({self.operand(x)}, {self.operand(weight)}" + "".join(", " + k for k in keywords) + ")"
        if bias is not None:
            channels = self.shape(node.args[1])[0]
            text += f" + reshape({self.operand(bias)}, shape=({channels}{', 1' * spatial}))"
        return self.result(node, text, x.rank, SUM if bias is not None else ATOM)

    def pool(self, node, a, name, spatial):
        x = a["input"]
        if any(a.get("padding") or []) or any(d != 1 for d in a.get("dilation") or []) or a.get("ceil_mode"):
            raise self.refuse(f"{name} with padding, dilation or ceil_mode")
        kernel = list(a["kernel_size"])
        stride = list(a.get("stride") or kernel)
        show = (lambda v: str(v[0])) if spatial == 1 else (lambda v: f"({v[0]}, {v[-1]})")
        keywords = f", kernel={show(kernel)}" + (f", stride={show(stride)}" if stride != kernel else "")
        return self.result(node, f"{name}({self.operand(x)}{keywords})", x.rank)

    def op_max_pool2d_with_indices(self, node, a):
        return _Tuple(lambda i: self.pool(node, a, "max_pool2d", 2) if i == 0 else self.unwritable(i))

    def op_max_pool1d_with_indices(self, node, a):
        return _Tuple(lambda i: self.pool(node, a, "max_pool1d", 1) if i == 0 else self.unwritable(i))

    def op_avg_pool2d(self, node, a):
        if not a.get("count_include_pad", True) or a.get("divisor_override") is not None:
            raise self.refuse("avg_pool2d with count_include_pad=False or a divisor_override")
        return self.pool(node, a, "avg_pool2d", 2)

    def op_avg_pool1d(self, node, a):
        return self.pool(node, a, "avg_pool1d", 1)

    def op_sort(self, node, a):
        x = a["input"]
        descending = ", descending=True" if a.get("descending") else ""
        return _Tuple(lambda i: self.result(node, f"sort({self.operand(x)}, axis={a.get('dim', -1) % x.rank}"
                                                     f"{descending})", x.rank) if i == 0 else self.unwritable(i))

    def op_topk(self, node, a):
        x = a["input"]
        if not a.get("largest", True) or not a.get("sorted", True):
            raise self.refuse("topk with largest=False or sorted=False")
        return _Tuple(lambda i: self.result(node, f"topk({self.operand(x)}, {a['k']}, axis="
                                                     f"{a.get('dim', -1) % x.rank})", x.rank)
                      if i == 0 else self.unwritable(i))

    def arg(self, node, name, a):
        x = a["input"]
        if a.get("dim") is None or a.get("keepdim"):
            raise self.refuse(f"{name} without dim=, or with keepdim=True")
        value = self.result(node, f"{name}({self.operand(x)}, axis={a['dim'] % x.rank})", x.rank - 1)
        value.kind = "integer"
        return value


def _generic(method):
    return lambda tracer, node, name, arguments: getattr(tracer, method)(node, name, arguments)


_GENERIC = {
    **{name: _generic("unary") for name in UNARY},
    **{name: _generic("binary") for name in BINARY},
    **{name: _generic("arithmetic") for name in ARITHMETIC},
    **{name: _generic("comparison") for name in COMPARISONS},
    **{name: _generic("reduction") for name in REDUCTIONS},
    **{name: _generic("axiswise") for name in AXISWISE},
    **{name: _generic("identity") for name in IDENTITIES},
    **{name: _generic("cast") for name in CASTS},
    **{name: _generic("reshape") for name in RESHAPES},
    **{name: _generic("matmul") for name in ("mm", "bmm", "matmul")},
    **{name: _generic("spread") for name in ("var", "std")},
    **{name: _generic("arg") for name in ("argmax", "argmin")},
    "special_xlogy": _generic("binary"),
}
_COMPARE = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}
SIZE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.neg,
                   torch.sym_float, torch.sym_int)


def _mapped(value, values: dict):
    if isinstance(value, (list, tuple)):
        return [values.get(v, v) if isinstance(v, torch.fx.Node) else v for v in value]
    return value


def _is_zero(value) -> bool:
    return type(value) is int and value == 0


def constant_value(value) -> _Value:
    text = number(value)
    precedence = PRODUCT if "/" in text else NEGATION if text.startswith("-") else ATOM
    return _Value(text, kind="number", precedence=precedence)


def number(value) -> str:
    """A Python constant as the exact rational its shortest repr writes (1e-05 is 1/100000)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"cannot trace this into a spec: the constant {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise SpecError(f"cannot trace this into a spec: the constant {value} is not finite")
    fraction = Fraction(repr(value))
    if fraction.denominator == 1:
        return str(fraction.numerator)
    return f"{fraction.numerator}/{fraction.denominator}"


def _user_line(node) -> str | None:
    """The user's source line that recorded ``node``, as "file:line: code"."""
    stack = node.meta.get("stack_trace")
    if not stack:
        return None
    frames = [line.strip() for line in stack.splitlines()]
    for k in range(len(frames) - 1, -1, -1):
        if frames[k].startswith("File "):
            location = frames[k].split(", in ")[0].replace("File ", "").replace('"', "").replace(", line ", ":")
            code = frames[k + 1] if k + 1 < len(frames) and not frames[k + 1].startswith("File ") else ""
            return f"{Path(location.split(':')[0]).name}:{location.split(':')[-1]}: {code}"
    return None


def _user_frame(tb) -> str:
    """The innermost frame of an exception's traceback outside torch and verify."""
    frames = [f for f in traceback.extract_tb(tb)
              if "/torch/" not in f.filename and "/verify/" not in f.filename and "<frozen" not in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()})"


def _inputs_of(fn, count: int) -> tuple:
    """(the callable to trace, the names of its inputs, the module's parameter tensors)."""
    if isinstance(fn, torch.nn.Module):
        parameters = dict(fn.named_parameters())
        names = _parameter_names(fn.forward, count)
        module = fn

        def call(*tensors):
            values = dict(zip(parameters, tensors[count:]))
            return torch.func.functional_call(module, values, tuple(tensors[:count]))

        named = [spec_name(p) for p in parameters]  # as check_function binds them
        return call, names + named, [p.detach() for p in parameters.values()]
    return fn, _parameter_names(fn, count), []


def _check_arity(fn, count: int) -> None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return
    required = [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                   p.POSITIONAL_OR_KEYWORD)]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not len(required) <= count <= len(positional):
        raise SpecError(f"cannot trace {_describe(fn)}: it takes {len(required)} inputs ({', '.join(required)}); "
                        f"{count} example inputs were given")


def _parameter_names(fn, count: int) -> list:
    try:
        parameters = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        parameters = []
    names = []
    for k in range(count):
        if k < len(parameters) and parameters[k].kind != parameters[k].VAR_POSITIONAL:
            names.append(parameters[k].name)
        else:
            names.append(f"x{k}")
    return names


def _symbols(placeholders, names, sizes: dict, taken: set) -> dict:
    """Each size symbol of the trace -> its name: as ``sizes`` names it, or the next free one."""
    named = {}
    for node, name in zip(placeholders, names):
        given = sizes.get(name) or ()
        for k, dim in enumerate(node.meta["val"].shape):
            if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol and k < len(given) \
                    and isinstance(given[k], str):
                named.setdefault(dim.node.expr, given[k])
    pool = (n for n in SIZE_NAMES + tuple(f"n{k}" for k in range(1, 100)) if n not in taken)
    used = set(named.values())
    for node in placeholders:
        for dim in node.meta["val"].shape:
            if isinstance(dim, torch.SymInt):
                for symbol in sorted(dim.node.expr.free_symbols, key=str):
                    if symbol not in named:
                        name = next(n for n in pool if n not in used)
                        named[symbol] = name
                        used.add(name)
    return named


def trace(fn, example_inputs, *, sizes: dict | None = None, domains: dict | None = None) -> Traced:
    """``fn`` traced at ``example_inputs`` into a spec (see ``spec_from``), with the dtype its
    casts compute in."""
    import torch.fx.experimental._config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    _check_arity(fn, len(example_inputs))
    call, names, parameters = _inputs_of(fn, len(example_inputs))
    # A parameter named as an op (cos, sin) gets a trailing underscore; inputs bind by position.
    names = [n + "_" if n in RESERVED else n for n in names]
    sizes, domains = ({k + "_" if k in RESERVED else k: v for k, v in (given or {}).items()}
                      for given in (sizes, domains))
    inputs = [torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach() for x in example_inputs]
    inputs += parameters
    unknown = set(domains or {}) - set(names)
    if unknown:
        raise SpecError(f"domains= names {', '.join(sorted(unknown))}, which {_describe(fn)} does not take; "
                        f"its inputs are {', '.join(names)}")
    anchor = getattr(torch.fx.proxy, "_register_stack_trace_anchor", None)
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    if anchor is not None and hasattr(target, "__code__"):
        anchor(target)
    try:
        # Duck sizing would tie two dims whose example sizes happen to be equal.
        with fx_config.patch(use_duck_shape=False):
            # Functionalized: an in-place op becomes the value it writes, as later reads see it.
            graph = make_fx(torch.func.functionalize(call), tracing_mode="symbolic",
                            record_stack_traces=True)(*inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the tracer refuses is untraceable code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cannot trace {_describe(fn)}: {type(exc).__name__}: {reason}"
                        f"{_user_frame(exc.__traceback__)}") from None
    graph.graph.eliminate_dead_code()
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    shape_env = _shape_env(placeholders)
    if shape_env is not None:
        _refuse_size_conditions(shape_env, fn)
    tracer = _Tracer(graph, names, dict(domains or {}),
                     _symbols(placeholders, names, sizes or {}, set(names)), shape_env)
    tracer.used_names.update(tracer.size_names.values())
    body = tracer.run()
    compute = _compute_dtype(tracer.casts)
    header = [f"# Traced from {_describe(fn)} by verify.spec_from (torch {torch.__version__.split('+')[0]})."]
    for source, target, line in tracer.casts:
        header.append(f"# cast {str(source)[6:]} -> {str(target)[6:]}" + (f" at {line}" if line else ""))
    text = "\n".join(header + [body]) + "\n"
    return Traced(parse(text, path=f"<traced {_describe(fn)}>"), compute)


def spec_from(fn, *example_inputs, sizes: dict | None = None, domains: dict | None = None) -> Spec:
    """The spec of torch function ``fn``, traced at ``example_inputs``.

    ``fn`` is a function of tensors or an ``nn.Module`` (its parameters become inputs, named
    as ``check_function`` binds them). Each dimension stays a size symbol, named by ``sizes``
    (``{"x": ("b", "n")}``) or the next free letter; give dimensions that may differ different
    example sizes, and no dimension the size 1 unless it is always 1. ``domains`` maps an input
    to ``(low, high)``: an ``Interval`` for a float input, an ``Integer`` range (low <= k <
    high) for an integer one; or to a domain's name ("Positive"). ``spec.source`` is the spec
    text, to print, save and review.

    >>> import torch
    >>> print(spec_from(lambda x: x * torch.sigmoid(x), torch.randn(3)).source.splitlines()[-1].split("  #")[0])
    mul_ = x * sigmoid(x)
    """
    return trace(fn, example_inputs, sizes=sizes, domains=domains).spec


def _describe(fn) -> str:
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__name__}.forward"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _shape_env(placeholders):
    for node in placeholders:
        for dim in node.meta["val"].shape:
            if isinstance(dim, torch.SymInt):
                return dim.node.shape_env
    return None


def _refuse_size_conditions(shape_env, fn) -> None:
    """A trace that holds only under a condition the function's own code puts on the sizes
    (``if x.shape[0] > 4:``) is no spec of the function: refused at that line. Conditions
    torch checks inside its own ops (a slice's end fits, a dim is not 1, as it assumes of
    every symbolic size) pick how torch computes, not what: the spec's shapes, in symbols,
    fix the math for every size."""
    for guard in shape_env.guards:
        expr = shape_env.simplify(guard.expr)
        if expr == sympy.true or isinstance(expr, sympy.Eq) or _holds_for_every_size(expr):
            continue
        where = getattr(getattr(guard, "sloc", None), "framework_loc", None)
        if isinstance(where, traceback.FrameSummary) and _inside_torch(where.filename):
            continue
        line = f" (at {Path(where.filename).name}:{where.lineno}: {(where.line or '').strip()})" \
            if isinstance(where, traceback.FrameSummary) else ""
        raise SpecError(f"cannot trace {_describe(fn)}: its code depends on the sizes ({expr}), so the trace "
                        f"holds only for some of them{line}")


def _inside_torch(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(torch.__file__).resolve().parent)


def _holds_for_every_size(condition) -> bool:
    """Whether sympy proves ``condition`` for all positive integer sizes (a slice's
    ``n // 2 <= n``)."""
    sizes = {s: sympy.Symbol(s.name, integer=True, positive=True) for s in condition.free_symbols}
    floors = {d: sympy.floor(d.args[0].xreplace(sizes) / d.args[1]) for d in sympy.preorder_traversal(condition)
              if type(d).__name__ == "FloorDiv"}
    try:
        return bool(sympy.simplify(condition.xreplace(floors).xreplace(sizes)) is sympy.true)
    except (TypeError, ValueError):
        return False


def _compute_dtype(casts: list) -> torch.dtype | None:
    widened = [target for source, target, _ in casts if WIDTH[target] > WIDTH[source]]
    return max(widened, key=WIDTH.get) if widened else None


def proves_equal(spec: Spec, other: Spec) -> bool:
    """True when sympy shows that two specs compute the same output from the same inputs, for
    every size: their inputs agree in name, domain kind and shape, and the outputs' element
    formulas (each step inlined) differ by 0."""
    from .lower.sympy import in_inputs, prove_equal

    if list(spec.inputs) != list(other.inputs) or any(
            spec.inputs[n].shape != other.inputs[n].shape for n in spec.inputs):
        return False
    mine = in_inputs(spec, spec.nodes[spec.output])
    theirs = in_inputs(other, other.nodes[other.output])
    if mine.shape != theirs.shape:
        return False
    claimed = theirs.expr.xreplace(dict(zip(theirs.indices, mine.indices)))
    return prove_equal(mine, claimed, spec)
