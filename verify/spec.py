"""Spec text -> ``Spec``: a whitelist over Python's ``ast``; the text is never executed.

The language (see ``examples/backprop.vspec``)::

    x: Real[n] = [2, 4]      # an input: domain, dims (ints or size symbols), example point
    y = x**2                 # a named intermediate
    o = 1/2 * sum(y)         # the last assignment is the output
    assert grad(o, x) == x   # a claimed closed form of a derivative

Every construct outside the whitelist is a ``SpecError`` that points at its line and column.
Numbers are exact (``1/2`` is a rational), and constant arithmetic is folded with sympy
numbers built from literals, never from strings.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction

import sympy

from .errors import SpecError
from .ir import (
    DOMAINS,
    Apply,
    Claim,
    Constant,
    Domain,
    Input,
    IntegerRange,
    Loc,
    Node,
    Ref,
    ShapeError,
    SizeRef,
    Spec,
    broadcast_shapes,
    depends_on_inputs,
    integer_range,
    is_integer,
)
from .lower.sympy import OutOfTime, time_limit
from .ops import (
    BOOLEAN_OPERATORS,
    CALLABLE,
    COMPARISON_OPERATORS,
    CONDITIONS,
    NORM_ORDERS,
    REGISTRY,
    normalize_axes,
    single_axis,
    slice_requirements,
)

CONSTANTS = {"pi": sympy.pi, "e": sympy.E}
CLAIM_KINDS = ("grad", "hessian")
RESERVED = set(REGISTRY) | set(CONSTANTS) | set(DOMAINS) | {"Interval", "Integer", "Data", "inf", *CLAIM_KINDS}

BINARY_OPERATORS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.Pow: "pow",
                    ast.MatMult: "matmul"}
# Folding a constant power costs about |exponent| * log2|base| bits; past this it is refused.
MAX_CONSTANT_BITS = 4096
FOLD_SECONDS = 2.0  # per constant op: sympy's exact value of lgamma(10**6) takes 6 s
MAX_DIM = 10**7
# What one point may hold, at the smallest sizes the spec allows: a tensor's rank and
# elements, and the elements of all its tensors together (each costs a few arrays of the
# batch's length in the reference and in torch, so 2^23 of them are a few GB).
MAX_RANK = 6
MAX_TENSOR_ELEMENTS = 2**22
MAX_POINT_ELEMENTS = 2**23
# Bounds on the text, so that neither Python's parser nor sympy's recursive algorithms can
# be driven into exhaustion by a spec.
MAX_SPEC_CHARACTERS = 1_000_000
MAX_LINE_LENGTH = 10_000
MAX_SYNTAX_NODES = 50_000
MAX_NESTING = 100

EXPRESSION_HINT = ("expected an expression of numbers, declared names, size symbols, pi, e, "
                   "+ - * / ** @, unary minus, .T, slices (x[1:], A[:, 0], x[1:n-1], x[::2]) and calls of: "
                   + ", ".join(sorted(CALLABLE)))
STATEMENT_HINT = ("a spec holds only input declarations (x: Real[n]), assignments (y = x**2) "
                  "and claims (assert grad(o, x) == expr)")

_DESCRIPTIONS = {
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string", ast.NamedExpr: "an assignment expression (:=)",
    ast.Subscript: "indexing", ast.Attribute: "attribute access", ast.Compare: "a comparison",
    ast.BoolOp: "a boolean operator", ast.IfExp: "a conditional expression",
    ast.Dict: "a dict", ast.Set: "a set", ast.List: "a list", ast.Tuple: "a tuple",
    ast.Starred: "a starred expression", ast.Await: "await", ast.Yield: "yield",
    ast.Import: "an import", ast.ImportFrom: "an import", ast.FunctionDef: "a function definition",
    ast.ClassDef: "a class definition", ast.For: "a loop", ast.While: "a loop", ast.If: "an if statement",
    ast.With: "a with statement", ast.Try: "a try statement", ast.Delete: "del", ast.Global: "global",
    ast.AugAssign: "an augmented assignment", ast.Expr: "a bare expression", ast.Return: "return",
}


def parse(text: str, *, path: str | None = None) -> Spec:
    """Parse spec text into a ``Spec``, without executing any of it.

    Raises ``SpecError`` (a ``ValueError``) with line, column and a caret line for anything
    outside the language, for undeclared names and for shape errors.

    >>> spec = parse("x: Real[n]\\no = sum(x**2)")
    >>> spec.output
    'o'
    """
    return _Parser(text, path).parse()


class _Parser:
    def __init__(self, text: str, path: str | None):
        self.text = text
        self.path = path
        self.lines = text.splitlines()
        self.inputs: dict[str, Input] = {}
        self.nodes: dict[str, Node] = {}
        self.claims: list[Claim] = []
        self.size_symbols: dict[str, sympy.Symbol] = {}
        self.sizes_from_examples: dict[str, int] = {}
        self.locs: dict[str, Loc] = {}
        self.size_requirements: list = []  # expressions in the size symbols that must be >= 1
        self.point_elements = 0  # of every tensor so far, each size symbol taken as 1

    # -- errors and locations ------------------------------------------------------------
    def error(self, message: str, where=None, hint: str | None = None) -> SpecError:
        line = column = None
        if isinstance(where, Loc):
            line, column = where.line, where.column
        elif where is not None:
            line, column = self.loc(where).line, self.loc(where).column
        return SpecError(message, source=self.text, path=self.path, line=line, column=column, hint=hint)

    def loc(self, node: ast.AST) -> Loc:
        line = getattr(node, "lineno", 1)
        # ast columns count UTF-8 bytes; messages count characters.
        raw = self.lines[line - 1].encode("utf-8") if line <= len(self.lines) else b""
        column = len(raw[: getattr(node, "col_offset", 0)].decode("utf-8", errors="ignore")) + 1
        return Loc(line, column, ast.get_source_segment(self.text, node) or "")

    # -- statements ----------------------------------------------------------------------
    def parse(self) -> Spec:
        if "\x00" in self.text:
            line = self.text[: self.text.index("\x00")].count("\n") + 1
            raise self.error("the spec contains a NUL byte", Loc(line, 1))
        if len(self.text) > MAX_SPEC_CHARACTERS:
            raise self.error(f"the spec has {len(self.text)} characters; at most {MAX_SPEC_CHARACTERS} are read")
        for number, line in enumerate(self.lines, start=1):
            if len(line) > MAX_LINE_LENGTH:
                raise self.error(f"the line has {len(line)} characters; at most {MAX_LINE_LENGTH} are read",
                                 Loc(number, MAX_LINE_LENGTH + 1))
        try:
            tree = ast.parse(self.text, mode="exec")
        except SyntaxError as exc:
            raise self.error(f"syntax error: {exc.msg}", Loc(exc.lineno or 1, exc.offset or 1),
                             hint=STATEMENT_HINT) from None
        except (RecursionError, MemoryError, ValueError) as exc:
            raise self.error(f"the spec cannot be parsed ({type(exc).__name__}): it is nested too deeply "
                             "or too large") from None
        self.check_size(tree)
        for statement in tree.body:
            try:
                self.statement(statement)
            except RecursionError:
                raise self.error("the statement is nested too deeply", statement) from None
        if not self.nodes:
            raise self.error("the spec has no output: add an assignment such as `o = sum(x)`",
                             Loc(max(len(self.lines), 1), 1), hint=STATEMENT_HINT)
        output = next(reversed(self.nodes))
        if not depends_on_inputs(self.nodes[output]):
            raise self.error(f"the output {output} does not depend on any input", self.locs[output])
        for claim in self.claims:
            if claim.of != output:
                raise self.error(f"grad(...) claims are about the output {output}, not {claim.of}", claim.loc)
            if self.nodes[output].shape:
                raise self.error(f"grad({output}, ...) needs a scalar output; {output} has shape "
                                 f"{_show(self.nodes[output].shape)}", claim.loc, hint="reduce it, as in o = sum(y)")
            wrt = self.inputs.get(claim.wrt) or self.nodes[claim.wrt]
            if not depends_on_inputs(wrt):
                raise self.error(f"{claim.wrt} does not depend on any input, so it has no gradient to claim",
                                 claim.loc)
        return Spec(self.inputs, self.nodes, self.claims, self.size_symbols, self.text, self.path, self.locs,
                    self.size_requirements)

    def check_size(self, tree: ast.Module) -> None:
        """Refuse trees with too many nodes or nested too deeply, walking without recursion."""
        count = 0
        for statement in tree.body:
            stack = [(statement, 0)]
            while stack:
                node, depth = stack.pop()
                count += 1
                if count > MAX_SYNTAX_NODES:
                    raise self.error(f"the spec has more than {MAX_SYNTAX_NODES} syntax nodes by here", statement)
                if depth > MAX_NESTING:
                    raise self.error(f"the expression is nested more than {MAX_NESTING} levels deep", node,
                                     hint="name intermediate steps (y = ...) to flatten it")
                stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))

    def statement(self, statement: ast.stmt) -> None:
        if isinstance(statement, ast.AnnAssign):
            self.declare_input(statement)
        elif isinstance(statement, ast.Assign):
            self.assign(statement)
        elif isinstance(statement, ast.Assert):
            self.claim(statement)
        else:
            what = _DESCRIPTIONS.get(type(statement), type(statement).__name__)
            raise self.error(f"{what} is not allowed in a spec", statement, hint=STATEMENT_HINT)

    def check_new_name(self, name: str, where: ast.AST) -> None:
        if name.startswith("__"):
            raise self.error(f"names starting with '__' are not allowed: {name}", where)
        if name.startswith("_"):
            raise self.error(f"names starting with '_' are reserved for verify's own use: {name}", where)
        if name in RESERVED:
            raise self.error(f"{name} is a reserved name (an op, constant or domain)", where)
        if name in self.inputs or name in self.nodes or name in self.size_symbols:
            raise self.error(f"{name} is already defined", where, hint="each name is defined once")

    def declare_input(self, statement: ast.AnnAssign) -> None:
        target = statement.target
        if not isinstance(target, ast.Name):
            raise self.error("an input declaration names one input, as in x: Real[n]", target)
        self.check_new_name(target.id, target)
        annotation, data = statement.annotation, False
        holder = annotation.value if isinstance(annotation, ast.Subscript) else annotation
        if isinstance(holder, ast.Call) and isinstance(holder.func, ast.Name) and holder.func.id == "Data":
            if len(holder.args) != 1 or holder.keywords:
                raise self.error("Data takes one domain, as in Data(Interval(0, 1))[n]", holder)
            data, inner = True, holder.args[0]
            annotation = ast.Subscript(inner, annotation.slice) if annotation is not holder else inner
        domain, shape = self.annotation(annotation)
        data = data or isinstance(domain, IntegerRange)  # integers are never differentiated
        example = None
        if statement.value is not None:
            example = self.example(statement.value, target.id, domain, shape)
        self.check_extent(f"the input {target.id}", shape, statement)
        self.inputs[target.id] = Input(shape, self.loc(target), name=target.id, domain=domain, example=example,
                                       data=data)
        self.locs[target.id] = self.loc(statement)

    def annotation(self, node: ast.AST) -> tuple[Domain, tuple]:
        dims_node = None
        if isinstance(node, ast.Subscript):
            node, dims_node = node.value, node.slice
        domain = self.domain(node)
        if dims_node is None:
            return domain, ()
        elements = dims_node.elts if isinstance(dims_node, ast.Tuple) else [dims_node]
        return domain, tuple(self.dim(d) for d in elements)

    def domain(self, node: ast.AST) -> Domain:
        hint = (f"domains: {', '.join(DOMAINS)}, Interval(a, b), each inside Data(...) for a data input, "
                "and Integer(a, b) for indices a <= k < b")
        if isinstance(node, ast.Name) and node.id in DOMAINS:
            return DOMAINS[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
            if len(node.args) != 2 or node.keywords:
                raise self.error("Integer takes two bounds, as in Integer(0, c) for 0 <= k < c", node)
            low, high = (self.integer_bound(a) for a in node.args)
            width = sympy.expand(high - low)
            if width.is_number and width < 1:
                raise self.error(f"Integer({low}, {high}) is empty: it holds the integers {low} <= k < {high}", node)
            if not width.is_number:
                self.size_requirements.append(width)
            return IntegerRange(low, high)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Interval":
            if len(node.args) != 2 or node.keywords:
                raise self.error("Interval takes two bounds, as in Interval(-1, 1)", node)
            low, high = (self.number(a) for a in node.args)
            if not low < high:
                raise self.error(f"Interval({low:g}, {high:g}) is empty: the lower bound must be smaller", node)
            return Domain("Interval", low, high, low_open=False, high_open=False)
        raise self.error("unknown domain", node, hint=hint)

    def integer_bound(self, node: ast.AST):
        """A bound of an integer range: a constant integer or a size symbol (declared here if new)."""
        if isinstance(node, ast.Name):
            return self.dim(node)
        return self.integer(node, "a bound of Integer(a, b)")

    def number(self, node: ast.AST) -> float:
        value = self.expression(node)
        if not isinstance(value, Constant):
            raise self.error("expected a constant number here", node)
        number = float(value.value)
        if not math.isfinite(number):
            raise self.error("expected a finite number here", node)
        return number

    def dim(self, node: ast.AST):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if not 1 <= node.value <= MAX_DIM:
                raise self.error(f"a dim must be between 1 and {MAX_DIM}, got {node.value}", node)
            return node.value
        if isinstance(node, ast.Name):
            name = node.id
            if name not in self.size_symbols:
                self.check_new_name(name, node)
                self.size_symbols[name] = sympy.Symbol(name, integer=True, positive=True)
            return self.size_symbols[name]
        raise self.error("a dim is a positive integer or a size symbol such as n", node)

    def example(self, node: ast.AST, name: str, domain: Domain, shape: tuple):
        def build(item, depth):
            if depth < len(shape):
                if not isinstance(item, ast.List):
                    raise self.error(f"the example for {name} needs a list at depth {depth + 1}", item)
                size = shape[depth]
                if isinstance(size, int) and len(item.elts) != size:
                    raise self.error(f"the example for {name} has {len(item.elts)} entries where the "
                                     f"declaration says {size}", item)
                if isinstance(size, sympy.Symbol):
                    bound = self.sizes_from_examples.setdefault(size.name, len(item.elts))
                    if bound != len(item.elts):
                        raise self.error(f"the example says {size} = {len(item.elts)}, but an earlier "
                                         f"example says {size} = {bound}", item)
                return [build(e, depth + 1) for e in item.elts]
            value = self.number(item)
            if not domain.contains(value):
                raise self.error(f"the example value {value:g} of {name} lies outside its domain {domain}", item)
            return value

        return build(node, 0)

    def assign(self, statement: ast.Assign) -> None:
        if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
            raise self.error("an assignment names one node, as in y = x**2", statement)
        target = statement.targets[0]
        self.check_new_name(target.id, target)
        value = self.expression(statement.value)
        if isinstance(value, (Input, Ref)):
            value = self.apply("pos", [value], {}, statement.value)  # an alias is a node of its own
        self.nodes[target.id] = value
        self.locs[target.id] = self.loc(statement)

    def claim(self, statement: ast.Assert) -> None:
        hint = "a claim reads: assert grad(o, x) == expr"
        test = statement.test
        if statement.msg is not None:
            raise self.error("a claim takes no message", statement.msg, hint=hint)
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
            raise self.error("a claim must compare with ==", test, hint=hint)
        call = test.left
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in CLAIM_KINDS):
            raise self.error("a claim starts with grad(output, variable) or hessian(output, input)", call, hint=hint)
        kind = call.func.id
        if len(call.args) != 2 or call.keywords or not all(isinstance(a, ast.Name) for a in call.args):
            raise self.error(f"{kind} takes two names: {kind}(o, x)", call, hint=hint)
        of, wrt = (a.id for a in call.args)
        for name, where in ((of, call.args[0]), (wrt, call.args[1])):
            if name not in self.inputs and name not in self.nodes:
                raise self.error(f"unknown name {name!r} in the claim", where, hint=self.known_names())
        if wrt in self.inputs and self.inputs[wrt].data:
            raise self.error(f"{wrt} is a data input: it has no gradient to claim", call.args[1],
                             hint="declare it without Data(...) to differentiate it")
        if kind == "hessian" and wrt not in self.inputs:
            raise self.error(f"hessian(o, x) is taken with respect to an input; {wrt} is not one", call.args[1],
                             hint=self.known_names())
        expr = self.expression(test.comparators[0])
        shape = self.inputs[wrt].shape if wrt in self.inputs else self.nodes[wrt].shape
        target_shape = shape + shape if kind == "hessian" else shape
        try:
            fits = broadcast_shapes(expr.shape, target_shape) == target_shape
        except ShapeError:
            fits = False
        if not fits:
            what = f"{wrt}'s shape twice" if kind == "hessian" else f"the shape of {wrt}"
            raise self.error(f"the claimed {kind} has shape {_show(expr.shape)}, but {kind}({of}, {wrt}) "
                             f"has {what}: {_show(target_shape)}", test.comparators[0])
        self.claims.append(Claim(kind, of, wrt, expr, self.loc(statement)))

    def known_names(self) -> str:
        names = [*self.inputs, *self.nodes, *self.size_symbols]
        return "names defined so far: " + (", ".join(names) if names else "none")

    # -- expressions ---------------------------------------------------------------------
    def expression(self, node: ast.AST) -> Node:
        method = getattr(self, "expr_" + type(node).__name__, None)
        if method is None:
            what = _DESCRIPTIONS.get(type(node), type(node).__name__)
            raise self.error(f"{what} is not allowed in an expression", node, hint=EXPRESSION_HINT)
        return method(node)

    def expr_Constant(self, node: ast.Constant) -> Node:
        value = node.value
        if type(value) is int:
            exact = sympy.Integer(value)
        elif type(value) is float:
            if not math.isfinite(value):
                raise self.error("a number must be finite", node)
            # The shortest repr is the literal as written, so 0.1 is exactly 1/10.
            fraction = Fraction(repr(value))
            exact = sympy.Rational(fraction.numerator, fraction.denominator)
        else:
            raise self.error(f"{type(value).__name__} constants are not allowed; numbers only", node,
                             hint=EXPRESSION_HINT)
        return Constant((), self.loc(node), value=exact)

    def expr_Name(self, node: ast.Name) -> Node:
        name = node.id
        loc = self.loc(node)
        if name in self.inputs:
            return self.inputs[name]
        if name in self.nodes:
            return Ref(self.nodes[name].shape, loc, name=name, target=self.nodes[name])
        if name in self.size_symbols:
            return SizeRef((), loc, symbol=self.size_symbols[name])
        if name in CONSTANTS:
            return Constant((), loc, value=CONSTANTS[name])
        if name in REGISTRY:
            raise self.error(f"{name} is an op: call it, as in {name}(...)", node)
        if name.startswith("__"):
            raise self.error(f"names starting with '__' are not allowed: {name}", node)
        raise self.error(f"unknown name {name!r}", node, hint=self.known_names())

    def expr_UnaryOp(self, node: ast.UnaryOp) -> Node:
        operand = self.expression(node.operand)
        if isinstance(node.op, (ast.UAdd, ast.USub)):
            return self.apply("pos" if isinstance(node.op, ast.UAdd) else "neg", [operand], {}, node)
        raise self.error(f"the operator {type(node.op).__name__} is not allowed", node, hint=EXPRESSION_HINT)

    def expr_BinOp(self, node: ast.BinOp) -> Node:
        op = BINARY_OPERATORS.get(type(node.op))
        if op is None:
            raise self.error(f"the operator {type(node.op).__name__} is not allowed", node, hint=EXPRESSION_HINT)
        return self.apply(op, [self.expression(node.left), self.expression(node.right)], {}, node)

    def expr_Attribute(self, node: ast.Attribute) -> Node:
        if node.attr != "T":
            raise self.error(f"attribute access is not allowed (.{node.attr}); only .T is", node,
                             hint=EXPRESSION_HINT)
        return self.apply("transpose", [self.expression(node.value)], {}, node)

    def expr_Call(self, node: ast.Call) -> Node:
        func = node.func
        if not isinstance(func, ast.Name):
            raise self.error("only ops of the registry can be called, by name", func, hint=EXPRESSION_HINT)
        if func.id in CLAIM_KINDS:
            raise self.error(f"{func.id}(...) may only appear on the left of a claim: assert {func.id}(o, x) == ...",
                             func)
        if func.id not in CALLABLE:
            raise self.error(f"unknown function {func.id!r}", func, hint=EXPRESSION_HINT)
        op = REGISTRY[func.id]
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.error("starred arguments are not allowed", node)
        params = {}
        arguments = list(node.args)
        if func.id == "einsum":  # the subscripts are data, read by their own grammar
            if not arguments or not (isinstance(arguments[0], ast.Constant) and isinstance(arguments[0].value, str)):
                raise self.error("einsum takes a subscript string first, as in einsum(\"ij,jk->ik\", A, B)", node)
            params["subscripts"] = self.subscripts(arguments.pop(0))
        extra = arguments[op.arity:] if op.positional_params else []
        if len(extra) > len(op.positional_params):
            raise self.error(f"{func.id} takes {op.arity} operand(s) and then {', '.join(op.positional_params)}",
                             node)
        for name, value in zip(op.positional_params, extra):
            params[name] = self.parameter(name, value)
        arguments = arguments[:len(arguments) - len(extra)]
        for keyword in node.keywords:
            if keyword.arg not in op.params:
                accepted = ", ".join(op.params) or "none"
                raise self.error(f"{func.id} takes no keyword {keyword.arg!r}", keyword,
                                 hint=f"keywords accepted by {func.id}: {accepted}")
            if keyword.arg in params:
                raise self.error(f"{keyword.arg} is given twice", keyword)
            params[keyword.arg] = self.parameter(keyword.arg, keyword.value)
        missing = [name for name in op.positional_params if name not in params]
        if missing:
            raise self.error(f"{func.id} needs {', '.join(missing)}: {func.id}(x, {', '.join(missing)})", node)
        operands = [self.condition(a) if (func.id, k) == ("where", 0) else self.expression(a)
                    for k, a in enumerate(arguments)]
        return self.apply(func.id, operands, params, node)

    def condition(self, node: ast.AST) -> Node:
        """The first argument of where: comparisons (chained ones too, as in 0 < x < 1),
        joined by and, or and not."""
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v) for v in node.values]
            joined = parts[0]
            for part in parts[1:]:
                joined = self.apply(BOOLEAN_OPERATORS[type(node.op)], [joined, part], {}, node)
            return joined
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.apply("logical_not", [self.condition(node.operand)], {}, node)
        if not (isinstance(node, ast.Compare) and all(type(o) in COMPARISON_OPERATORS for o in node.ops)):
            raise self.error("the condition of where is a comparison, or comparisons joined by and, or, not, "
                             "as in where(x > 0 and y > 0, x, 0)", node)
        terms = [self.expression(e) for e in [node.left, *node.comparators]]
        joined = None
        for operator, left, right in zip(node.ops, terms, terms[1:]):
            if isinstance(left, Constant) and isinstance(right, Constant):
                raise self.error("the condition compares two constants", node)
            comparison = self.apply(COMPARISON_OPERATORS[type(operator)], [left, right], {}, node)
            joined = comparison if joined is None else self.apply("logical_and", [joined, comparison], {}, node)
        return joined

    def expr_Compare(self, node: ast.Compare) -> Node:
        raise self.error("a comparison is allowed only as the condition of where(cond, a, b)", node,
                         hint=EXPRESSION_HINT)

    def expr_Subscript(self, node: ast.Subscript) -> Node:
        operand = self.expression(node.value)
        if not isinstance(node.slice, (ast.Slice, ast.Tuple, ast.Constant, ast.UnaryOp)):
            rows = self.expression(node.slice)
            if is_integer(rows):  # x[t], E[argmin(d)]: the rows of x that the integers name
                return self.apply("index", [operand, rows], {}, node)
        elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        items = tuple(self.slice_item(e) for e in elements)
        return self.apply("slice", [operand], {"items": items}, node)

    def slice_item(self, node: ast.AST):
        """An integer index, or a slice (start, stop, step): bounds are integers or expressions
        in the size symbols (x[1:n-1]), the step a positive integer (x[::2])."""
        if isinstance(node, ast.Slice):
            bounds = tuple(None if bound is None else self.size_expression(bound) for bound in (node.lower, node.upper))
            if node.step is None:
                return bounds
            step = self.integer(node.step, "a slice's step")
            if step < 1:
                raise self.error("a slice's step is a positive integer", node.step)
            return (*bounds, step)
        return self.integer(node, "an index")

    def size_expression(self, node: ast.AST):
        """An integer, or +, -, * and // (by a positive integer) of integers and size symbols: a
        slice bound such as n - 1, or n // 2."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv) or \
                isinstance(node, ast.BinOp) and any(isinstance(side, ast.BinOp) and isinstance(side.op, ast.FloorDiv)
                                                    for side in (node.left, node.right)):
            bound = self.floor_division(node)
        else:
            bound = self.exact_size(self.expression(node))
        if bound is None:
            raise self.error("a slice bound is an integer or an expression in the size symbols, as in n - 1 "
                             "or n // 2", node)
        return int(bound) if bound.is_Integer else bound

    def exact_size(self, part):
        if isinstance(part, Constant) and part.value.is_Integer:
            return part.value
        if isinstance(part, SizeRef):
            return part.symbol
        if isinstance(part, Apply) and part.op in ("add", "sub", "mul", "neg"):
            values = [self.exact_size(o) for o in part.operands]
            if None not in values:
                return {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                        "neg": lambda a: -a}[part.op](*values)
        return None

    def floor_division(self, node: ast.AST):
        """A size expression holding //, read from the syntax (// is no op on tensors)."""
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv):
            left, right = self.floor_division(node.left), self.floor_division(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.FloorDiv):
                return sympy.floor(left / right) if right.is_Integer and right > 0 else None
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        return self.exact_size(self.expression(node))

    def subscripts(self, node: ast.Constant) -> tuple:
        """einsum's string as (operand subscripts, output subscripts): letters, commas, one ->."""
        text = node.value.replace(" ", "")
        inputs, arrow, output = text.partition("->")
        terms = inputs.split(",")
        letters = [*terms, output] if arrow else terms
        if len(text) > 200 or not all(term.isascii() and (term.isalpha() or term == "") for term in letters) \
                or "" in terms:
            raise self.error("einsum's subscripts are letters per operand, joined by commas, with an optional "
                             "-> and the output's letters, as in \"bij,bjk->bik\"", node)
        for term in letters:
            if len(set(term)) != len(term):
                raise self.error(f"einsum's subscript {term!r} repeats a letter (diagonals are not supported)", node)
        if not arrow:  # numpy's implicit output: the letters used once, in alphabetical order
            output = "".join(sorted(c for c in set(inputs) - {","} if inputs.count(c) == 1))
        missing = set(output) - set("".join(terms))
        if missing:
            raise self.error(f"einsum's output uses {''.join(sorted(missing))}, which no operand has", node)
        return tuple(terms), output

    def integer(self, node: ast.AST, what: str) -> int:
        value = self.expression(node)
        if not (isinstance(value, Constant) and value.value.is_Integer):
            raise self.error(f"{what} is a constant integer", node)
        return int(value.value)

    def parameter(self, key: str, node: ast.AST):
        if key in ("keepdims", "descending"):
            if isinstance(node, ast.Constant) and type(node.value) is bool:
                return node.value
            raise self.error(f"{key} is True or False", node)
        if key in ("k", "classes"):
            if isinstance(node, ast.Name) and node.id in self.size_symbols:
                return self.size_symbols[node.id]
            return self.integer(node, f"{key} is a size symbol or a constant integer; it")
        if key == "p":
            order = math.inf if isinstance(node, ast.Name) and node.id == "inf" else None
            if order is None and isinstance(node, ast.Constant) and type(node.value) is int:
                order = node.value
            if order not in NORM_ORDERS:
                raise self.error("p is 1, 2 or inf", node)
            return order
        items = node.elts if isinstance(node, ast.Tuple) else [node]
        values = []
        for item in items:
            if key == "shape" and isinstance(item, ast.Name) and item.id in self.size_symbols:
                values.append(self.size_symbols[item.id])
                continue
            values.append(self.integer(item, f"{key} takes an integer or a tuple of integers; each"))
        return tuple(values) if isinstance(node, ast.Tuple) else values[0]

    def apply(self, op_name: str, operands: list, params: dict, node: ast.AST) -> Node:
        op = REGISTRY[op_name]
        loc = self.loc(node)
        if op.arity is None and len(operands) < op.min_operands:
            raise self.error(f"{op_name} takes {op.min_operands} or more operands, got {len(operands)}", node)
        if op.arity is not None and len(operands) != op.arity:
            raise self.error(f"{op_name} takes {op.arity} argument(s), got {len(operands)}", node)
        if op_name != "where" and op_name not in CONDITIONS and any(
                o.op in CONDITIONS for o in operands if isinstance(o, Apply)):
            raise self.error("a comparison is allowed only as the condition of where(cond, a, b)", node)
        if op_name not in CONDITIONS and op_name != "pos":
            self.check_integers(op_name, operands, node)
        try:
            shape = op.infer_shape([o.shape for o in operands], params)
        except ShapeError as exc:
            raise self.error(str(exc), node) from None
        if op_name == "reshape":
            params = {"shape": shape}  # the resolved target, -1 filled in
        if op_name == "slice":
            self.size_requirements.extend(slice_requirements(operands[0].shape, params["items"]))
        if op.integer_operands:
            self.check_index_range(op_name, operands, params, node)
        if op_name == "topk":  # k of the axis's elements
            self.size_requirements.append(operands[0].shape[single_axis(params, operands[0].rank)] - params["k"] + 1)
        self.size_requirements.extend(d for d in shape if not isinstance(d, int))
        self.check_extent(f"the result of {op_name}", shape, node)
        if op_name == "div" and isinstance(operands[1], Constant) and operands[1].value.is_zero:
            raise self.error("division by the constant zero", node)
        if op.kind == "elementwise" and all(isinstance(o, Constant) for o in operands):
            return Constant((), loc, value=self.fold(op_name, [o.value for o in operands], node))
        return Apply(shape, loc, op=op_name, operands=tuple(operands), params=tuple(sorted(params.items())))

    def check_extent(self, what: str, shape: tuple, node: ast.AST) -> None:
        """Refuse a tensor past the rank or element bounds at the smallest sizes (each size
        symbol 1), where no draw could check it, naming it."""
        if len(shape) > MAX_RANK:
            raise self.error(f"{what} has rank {len(shape)}; at most {MAX_RANK} dims are checked", node)
        elements = math.prod(d if isinstance(d, int) else 1 for d in shape)
        self.point_elements += elements
        if elements > MAX_TENSOR_ELEMENTS:
            raise self.error(f"{what} holds {elements} elements per point; at most {MAX_TENSOR_ELEMENTS} (2^22) "
                             "are checked", node, hint="declare the large dims with a size symbol, as in Real[n, m]")
        if self.point_elements > MAX_POINT_ELEMENTS:
            raise self.error(f"by {what}, the spec's tensors hold {self.point_elements} elements per point; at most "
                             f"{MAX_POINT_ELEMENTS} (2^23) are checked", node,
                             hint="declare the large dims with a size symbol, as in Real[n, m]")

    def check_integers(self, op_name: str, operands: list, node: ast.AST) -> None:
        """Integers (indices, labels) go where an op takes them, and reals everywhere else."""
        for position, operand in enumerate(operands):
            wanted = position in REGISTRY[op_name].integer_operands
            what = operand.loc.text or "this operand"
            if wanted and not is_integer(operand):
                raise self.error(f"{op_name} takes integers here, and {what} is not: declare an input "
                                 "Integer(a, b), or use argmax/argmin", node)
            if not wanted and is_integer(operand):
                if op_name == "stop_gradient":
                    raise self.error(f"{what} holds integers: it has no gradient to stop", node)
                raise self.error(f"{what} holds integers (an index or a label); {op_name} takes real numbers",
                                 node, hint="integers index (take, x[t]), make one_hot vectors, or are compared in where")

    def check_index_range(self, op_name: str, operands: list, params: dict, node: ast.AST) -> None:
        """The integers of an index operand must lie in the axis they index."""
        for position in REGISTRY[op_name].integer_operands:
            low, high = integer_range(operands[position])
            if op_name == "one_hot":
                size, where = params["classes"], "the classes"
            elif op_name == "take":
                axis = normalize_axes(params.get("axis", -1), operands[0].rank)[0]
                size, where = operands[0].shape[axis], f"axis {axis} of {operands[0].loc.text}"
            else:
                size, where = operands[0].shape[0], f"the rows of {operands[0].loc.text}"
            below = low if isinstance(low, int) else None
            if below is not None and below < 0:
                raise self.error(f"the indices {operands[position].loc.text} may be negative ({low}); "
                                 f"{op_name} takes 0 <= k < {size}", node)
            room = sympy.expand(sympy.Integer(size) - high if isinstance(size, int) else size - high)
            if room.is_number and room < 0:
                raise self.error(f"the indices {operands[position].loc.text} reach {high} - 1, past {where} "
                                 f"(size {size})", node)
            if not room.is_number:
                self.size_requirements.append(room + 1)  # drawn sizes keep every index in range

    def fold(self, op_name: str, values: list, node: ast.AST) -> sympy.Expr:
        if op_name == "pow":
            base, exponent = values
            if exponent.is_number and abs(exponent) > 1 and not base.is_zero:
                bits = float(abs(exponent)) * max(1.0, abs(float(sympy.log(abs(base), 2))))
                if bits > MAX_CONSTANT_BITS:
                    raise self.error(f"the constant power is too large to compute (about {bits:.3g} bits)", node)
        try:
            # lgamma(10**300) is log((10**300 - 1)!) to sympy, which no machine computes.
            with time_limit(FOLD_SECONDS):
                folded = REGISTRY[op_name].sympy_form(*values)
                real = folded.is_extended_real and folded.is_finite
        except (RecursionError, OutOfTime):
            raise self.error(f"the constant {self.loc(node).text} is too large to compute exactly (sympy gave up within "
                             f"{FOLD_SECONDS} s)", node, hint="pass it as an input, or take a smaller argument") from None
        if not real:
            raise self.error(f"the constant {op_name}(...) is {folded}, not a finite real number", node)
        return folded


def _show(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
