"""Fuzz mode: random specs from the op registry, checked against sympy through several AD paths.

Hypothesis draws well-typed specs over a vector, a square matrix and a scalar that broadcast:
compositions (depth 1 to 4) of the registry's elementwise ops, reductions with axes and
keepdims, axis-wise ops (softmax, cumsum, logcumsumexp, ...), where with comparisons, matmul,
outer, trace, diag, transposes, reshape, concat, stack, slices, and det and inv of
well-conditioned matrices (``reach="elementwise"`` keeps to one-argument elementwise ops and
+ - * /). Each spec is checked through:

* ``eager``: torch's autograd on the spec's lowering (values, VJPs, JVPs by forward AD, and
  with ``order2`` Hessian-vector products by double backward and forward over reverse);
* ``compile``: the same function compiled once by ``torch.compile`` (inductor on the CPU where
  a C++ compiler is found, else aot_eager, which ``compile_backend`` says), at one drawn shape:
  its values and its compiled backward (torch's compiled autograd has no double backward);
* ``func.vjp``, ``func.grad``, ``func.jacrev``, ``func.jacfwd``: the same function, with its
  backward computed by those ``torch.func`` transforms (jacrev is vmap over vjp, jacfwd vmap
  over jvp), and with ``order2`` differentiated again by autograd;
* ``func.vmap``: the backward is ``vmap(grad(f))`` over a batch of copies of the point, so
  torch's batching rules are checked too;
* ``func.hessian`` (with ``order2`` only): Hessian-vector products from ``torch.func.hessian``.

Points where the math is undefined, kinks, ties and untaken ``where`` branches are rejected by
the engine under the registry's rules, so a finding is a discrepancy at a point where the math is
well defined. Hypothesis shrinks the spec (its expression loses nodes), the engine the input.
Findings are deduplicated by op set, check and AD path, classified (``Finding.kind``), and each
is saved as a ``.vspec`` with the failing point as its example, plus a standalone torch script
(the spec's function as torch traced it, ``make_fx``) that shows it without verify.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from .errors import Mismatch, SpecError, Unchecked
from .ops import CALLABLE, REGISTRY
from .strategies import draws_by_seed_alone

PATHS = ("eager", "compile", "func.vjp", "func.grad", "func.jacrev", "func.jacfwd", "func.vmap", "func.hessian")
SECOND_ORDER_PATHS = ("func.hessian",)  # the same as func.vjp at first order
BINARY = ("+", "-", "*", "/")
INNER_EXAMPLES = 10
# A compiled function is compiled once per drawn spec, at this size of every size symbol.
COMPILED_SIZE = 3
# How torch says it refuses a transform or a feature for a function, rather than failing at it.
UNSUPPORTED = r"not (currently )?(supported|implemented)|NotImplementedError|does not (currently )?support"


def fuzzable_ops() -> list:
    """The registry's one-argument elementwise ops that a spec calls by name (the other ops
    are drawn by their own productions, see ``spec_texts``)."""
    return sorted(name for name, op in REGISTRY.items()
                  if op.kind == "elementwise" and op.arity == 1 and not op.params and op.result == "real"
                  and name in CALLABLE)


@st.composite
def spec_texts(draw, ops: list, max_depth: int = 4, reach: str = "registry") -> str:
    """A well-typed spec over a vector ``x`` (and maybe a square matrix ``A`` and a scalar
    ``s``, which broadcast against it), an expression up to ``max_depth`` deep, and its sum
    or the tensor as the output. With ``reach`` "elementwise", the expression composes the
    one-argument ``ops`` and + - * / only; with "registry", also reductions with axes and
    keepdims, the axis-wise ops (softmax, cumsum, ...), binary elementwise ops, where with
    comparisons, matmul, outer, trace, diag, transposes, reshape, concat, stack, slices, and
    det and inv of well-conditioned matrices, and of the real-code ops sort, clamp, einsum,
    swapaxes and permute."""
    inputs = {"v": "x"}
    declarations = ["x: Real[n]"]
    if reach == "registry" and draw(st.booleans(), label="a matrix input"):
        inputs["m"] = "A"
        declarations.append("A: Real[n, n]")
    if draw(st.booleans(), label="a second input"):
        kind = draw(st.sampled_from(["v", "s"] if reach == "registry" else ["v", "m", "s"]), label="its kind")
        name = {"v": "y", "m": "B", "s": "s"}[kind]
        declarations.append(f"{name}: Real" + {"v": "[n]", "m": "[n, n]", "s": ""}[kind])
        inputs.setdefault(kind, name)
    kind = draw(st.sampled_from(["v", "m", "s"]), label="kind") if reach == "registry" else "v"
    body = _Expressions(draw, ops, inputs, reach).of(kind, draw(st.integers(1, max_depth), label="depth"))
    if not any(re.search(rf"\b{name}\b", body) for name in inputs.values()):
        body = f"{body} + x"
    output = f"sum({body})" if draw(st.booleans(), label="summed") else f"{body} + 0 * x"
    return "\n".join(declarations + [f"o = {output}"]) + "\n"


REDUCTIONS = ("sum", "mean", "prod", "amax", "amin", "logsumexp", "var", "std", "norm")
AXISWISE = ("softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp")
BINARY_OPS = ("maximum", "minimum", "atan2", "hypot")
COMPARISONS = (">", ">=", "<", "<=")
# A matrix of entries below 1 / (2n) off the identity: diagonally dominant, so det and inv are
# well conditioned, whatever the drawn entries are.
WELL_CONDITIONED = "(tanh({}) / (2 * n) + diag(0 * x + 1))"


class _Expressions:
    """Expressions of a kind: "s" (a scalar), "v" (a vector of n), "m" (an n x n matrix)."""

    def __init__(self, draw, ops, inputs: dict, reach: str):
        self.draw, self.ops, self.inputs, self.reach = draw, ops, inputs, reach

    def pick(self, options, label):
        return self.draw(st.sampled_from(options), label=label)

    def leaf(self, kind: str) -> str:
        if self.reach == "elementwise":  # any input: they broadcast against each other
            return self.pick(sorted(self.inputs.values()), "input")
        if kind in self.inputs:
            return self.inputs[kind]
        return {"s": "sum(x)", "v": "x", "m": "outer(x, x)"}[kind]

    def of(self, kind: str, depth: int) -> str:
        if depth == 0 or self.draw(st.integers(0, 3), label="leaf") == 0:
            return self.leaf(kind)
        makers = [self.unary, self.arithmetic]
        if self.reach == "registry":
            makers += [self.reduction, self.binary, self.where]
            makers += {"s": [self.scalar_structure], "v": [self.axiswise, self.vector_structure],
                       "m": [self.axiswise, self.matrix_structure]}[kind]
        return self.pick(makers, "production")(kind, depth - 1)

    def unary(self, kind, depth):
        return f"{self.pick(self.ops, 'op')}({self.of(kind, depth)})"

    def arithmetic(self, kind, depth):
        # An operand may be of a lower rank: broadcasting between ranks.
        lower = {"s": ["s"], "v": ["v", "s"], "m": ["m", "v", "s"]}[kind] if self.reach == "registry" else [kind]
        left, right = kind, self.pick(lower, "other operand")
        if self.draw(st.booleans(), label="swapped"):
            left, right = right, left
        return "({} {} {})".format(*self.distinct(left, right, depth, self.pick(BINARY, "operator")))

    def binary(self, kind, depth):
        op = self.pick(BINARY_OPS, "binary op")
        return "{1}({0}, {2})".format(*self.distinct(kind, kind, depth, op))

    def distinct(self, left, right, depth, op) -> tuple:
        """(left, op, right), two operand expressions that differ. Sympy folds a step whose
        operands are the same expression (x / x is 1, x - x is 0), so its allowance misses what
        torch's backward of the two operands rounds (docs/findings.md): not what is hunted; and
        x > x is a tie at every point, which the engine rejects."""
        first, second = self.of(left, depth), self.of(right, depth)
        if first == second:
            second = f"({second} + 1)"
        return first, op, second

    def where(self, kind, depth):
        condition = "{} {} {}".format(*self.distinct(kind, kind, depth, self.pick(COMPARISONS, "comparison")))
        return f"where({condition}, {self.of(kind, depth)}, {self.of(kind, depth)})"

    def reduction(self, kind, depth):
        op = self.pick(REDUCTIONS, "reduction")
        if kind == "s":
            reduced = self.pick(["v", "m", "other"], "reduced")
            return f"{op}({self.longer_vector(depth) if reduced == 'other' else self.of(reduced, depth)})"
        if kind == "v":
            return f"{op}({self.of('m', depth)}, axis={self.pick([0, 1, -1], 'axis')})"
        # keepdims: a row or column that broadcasts back against a matrix
        axis = self.pick([0, 1], "axis")
        return f"({op}({self.of('m', depth)}, axis={axis}, keepdims=True) * {self.of('m', depth)})"

    def axiswise(self, kind, depth):
        axis = f", axis={self.pick([0, 1, -1], 'axis')}" if kind == "m" else ""
        return f"{self.pick(AXISWISE, 'axis-wise op')}({self.of(kind, depth)}{axis})"

    def scalar_structure(self, kind, depth):
        return self.pick([
            lambda: f"({self.of('v', depth)} @ {self.of('v', depth)})",
            lambda: f"dot({self.of('v', depth)}, {self.of('v', depth)})",
            lambda: f"trace({self.of('m', depth)})",
            lambda: f"det{WELL_CONDITIONED.format(self.of('m', depth))}",
            lambda: f"{self.of('v', depth)}[0]",
        ], "scalar structure")()

    def longer_vector(self, depth):
        """A vector of another length than n, which only a whole reduction brings back."""
        return self.pick([
            lambda: f"reshape({self.of('m', depth)}, shape=-1)",
            lambda: f"concat({self.of('v', depth)}, {self.of('v', depth)})",
            lambda: f"{self.of('v', depth)}[1:]",
            lambda: f"stack({self.of('v', depth)}, {self.of('v', depth)}, axis=1)[:, 1]",
        ], "vector of another length")()

    def vector_structure(self, kind, depth):
        return self.pick([
            lambda: f"({self.of('m', depth)} @ {self.of('v', depth)})",
            lambda: f"({self.of('v', depth)} @ {self.of('m', depth)})",
            lambda: f"diag({self.of('m', depth)})",
            lambda: f"{self.of('m', depth)}[{self.pick(['0', ':, 0', '-1'], 'index')}]",
            lambda: f"(inv{WELL_CONDITIONED.format(self.of('m', depth))} @ {self.of('v', depth)})",
            lambda: f"sort({self.of('v', depth)}{self.pick(['', ', descending=True'], 'order')})",
            lambda: f"clamp({self.of('v', depth)}, -1, 1)",
            lambda: f"einsum(\"ij,j->i\", {self.of('m', depth)}, {self.of('v', depth)})",
        ], "vector structure")()

    def matrix_structure(self, kind, depth):
        return self.pick([
            lambda: f"({self.of('m', depth)} @ {self.of('m', depth)})",
            lambda: f"{self.of('m', depth)}.T",
            lambda: f"outer({self.of('v', depth)}, {self.of('v', depth)})",
            lambda: f"diag({self.of('v', depth)})",
            lambda: f"reshape({self.of('m', depth)}, shape=(n, n))",
            lambda: f"inv{WELL_CONDITIONED.format(self.of('m', depth))}",
            lambda: f"{self.pick(['swapaxes({}, 0, 1)', 'permute({}, (1, 0))'], 'axes')}".format(self.of('m', depth)),
        ], "matrix structure")()


@dataclass
class Finding:
    spec: str
    path: str  # the AD path
    check: str  # value, gradient, JVP, HVP, or an error of torch's
    ops: tuple
    report: str
    failure: object  # verify.report.Failure

    @property
    def key(self) -> tuple:
        return self.ops, self.check, self.path

    @property
    def kind(self) -> str:
        """What the finding is, as far as its check and report tell: "limitation of this
        tool" (verify itself raised), "torch: unsupported" (torch refused a transform or a
        feature for this function), "torch convention" (a derivative that takes one side
        at an exact kink, where verify asks for torch's), or "torch bug" (a wrong value or
        derivative where the math is defined, or an exception on valid input)."""
        if self.failure is None:
            return "limitation of this tool"
        if self.failure.error and re.search(UNSUPPORTED, self.failure.error):
            return "torch: unsupported"
        if "exactly on a kink" in self.report:
            return "torch convention"
        return "torch bug"


def check_paths(text: str, paths=PATHS, order: int = 1, modes=("rev", "fwd"), dtype=torch.float64,
                seed: int = 0, max_examples: int = INNER_EXAMPLES) -> Finding | None:
    """The first disagreement with sympy along ``paths``, or None."""
    import verify

    spec = verify.parse(text)
    for path in paths:
        if path in SECOND_ORDER_PATHS and order < 2:
            continue
        try:
            if path == "eager":
                verify.check(spec, seed=seed, dtype=dtype, order=order, modes=modes, max_examples=max_examples)
            elif path == "compile":  # one shape, compiled once; torch's compiled autograd has no double backward
                verify.check_function(compiled(spec), spec, seed=seed, dtype=dtype, modes=("rev",),
                                      max_examples=max_examples, sizes=dict.fromkeys(spec.size_symbols, COMPILED_SIZE))
            else:
                # Forward mode is torch.func's inside jacfwd (vmap of jvp); the Function has no jvp.
                verify.check_function(transformed(spec, path), spec, seed=seed, dtype=dtype, order=order,
                                      modes=("rev",), max_examples=max_examples)
        except Mismatch as mismatch:
            if path != "eager" and _rejected_by_eager(spec, mismatch.failure, dtype):
                continue  # the spec's own steps cannot be computed there: no discrepancy between paths
            return Finding(text, path, mismatch.failure.check, ops_of(text), str(mismatch), mismatch.failure)
        except (Unchecked, SpecError):
            continue  # nothing checkable here (every point undefined): no finding, and no pass
        except Exception as error:  # noqa: BLE001 - a bug of verify itself: a finding about the tool
            return Finding(text, path, f"verify raised {type(error).__name__}", (), f"{type(error).__name__}: {error}",
                           None)
    return None


def _rejected_by_eager(spec, failure, dtype) -> bool:
    """Whether the engine rejects ``failure``'s point for the spec's own lowering, as it does
    where a step of the spec overflows the dtype (exp(x) / exp(x) at x = 800): a path computes
    the same steps, and is judged as a function, where no step is excused."""
    from collections import Counter

    from .checks import Options, evaluate
    from .plan import plan
    from .report import Result

    if failure.point is None:
        return False
    rejected = Counter()
    evaluate(plan(spec, failure.point.sizes), None, failure.point, Options(dtype, modes=("rev",)),
             Result("", str(dtype), 0), rejected)
    return bool(rejected)


def _called(text: str) -> set:
    """The functions a spec's text calls."""
    return set(re.findall(r"\b(\w+)\(", text))


def ops_of(text: str) -> tuple:
    """The ops of a spec's expression, by the names a finding is known by."""
    body = "\n".join(line for line in text.splitlines() if "=" in line)
    operators = {b for b in (*BINARY, "@", *COMPARISONS) if f" {b} " in body}
    return tuple(sorted(_called(body) | operators | ({"transpose"} if ".T" in body else set())
                        | ({"slice"} if "[" in body else set())))


def _spec_function(spec):
    """The spec's torch lowering as a function of one point's input tensors, returning the output."""
    from .subject import SpecSubject

    program = SpecSubject(spec, {spec.nodes[spec.output]: spec.output}).program
    names = list(spec.inputs)

    def function(*tensors):
        sizes = _sizes(spec, tensors)
        batched = {name: t.unsqueeze(0) for name, t in zip(names, tensors)}  # the program runs on batches
        return program.run(batched, sizes, tensors[0].dtype, retain=False)[spec.output][0]

    return function


@functools.cache
def compile_backend() -> tuple:
    """(torch.compile's backend for the ``compile`` path, why): inductor, which generates C++ on
    the CPU, where a C++ compiler is found; else aot_eager, which traces and partitions the
    same graphs, forward and backward, and runs them eagerly."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler):
        return "inductor", f"inductor (C++ by {compiler})"
    return "aot_eager", f"aot_eager: no C++ compiler ({compiler}) found for inductor"


def compiled(spec):
    """The spec's function compiled by ``torch.compile`` (``compile_backend``), at fixed shapes."""
    function = torch.compile(_spec_function(spec), backend=compile_backend()[0], dynamic=False)
    function.__name__ = function.__qualname__ = "compiled"
    return function


def transformed(spec, path: str):
    """The spec's function of its inputs, as an autograd.Function whose backward is computed by
    the torch.func transform ``path``."""
    function = _spec_function(spec)
    argnums = tuple(range(len(spec.inputs)))

    def weighted(grad):
        return lambda *tensors: (function(*tensors) * grad).sum()

    def backward(tensors, grad):
        if path == "func.vjp":
            return torch.func.vjp(function, *tensors)[1](grad)
        if path == "func.grad":
            return torch.func.grad(weighted(grad), argnums=argnums)(*tensors)
        if path == "func.vmap":
            per_copy = torch.func.vmap(torch.func.grad(weighted(grad), argnums=argnums))
            return tuple(g[0] for g in per_copy(*(torch.stack([t, t]) for t in tensors)))
        if path == "func.hessian":
            return HessianVJP.apply(grad, *tensors)
        jacobian = {"func.jacrev": torch.func.jacrev, "func.jacfwd": torch.func.jacfwd}[path]
        jacobians = jacobian(function, argnums=argnums)(*tensors)
        return tuple(torch.tensordot(grad, j, dims=grad.dim()) for j in jacobians)

    class HessianVJP(torch.autograd.Function):
        """The VJP, whose own derivative (what double backward asks for) comes from
        torch.func.hessian of grad · f, and from the JVP for the cotangent."""

        @staticmethod
        def forward(grad, *tensors):
            return torch.func.vjp(function, *tensors)[1](grad)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, *directions):
            grad, *tensors = ctx.saved_tensors
            hessians = torch.func.hessian(weighted(grad), argnums=argnums)(*tensors)
            products = tuple(sum(torch.tensordot(hessians[i][j], v, dims=v.dim()) for j, v in enumerate(directions))
                             for i in argnums)
            along = torch.func.jvp(function, tuple(tensors), directions)[1]
            return (along, *products)

    class Transformed(torch.autograd.Function):
        @staticmethod
        def forward(*tensors):
            return function(*tensors)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            return backward(ctx.saved_tensors, grad)

    Transformed.__name__ = Transformed.__qualname__ = path.replace(".", "_")
    return Transformed.apply


def _sizes(spec, tensors) -> dict:
    sizes = {}
    for declared, tensor in zip(spec.inputs.values(), tensors):
        for dim, length in zip(declared.shape, tensor.shape):
            if not isinstance(dim, int):
                sizes[dim.name] = int(length)
    return sizes


def fuzz(*, ops: list | None = None, max_examples: int = 200, seconds: float = 600.0, paths=PATHS,
         order: int = 1, modes=("rev", "fwd"), dtype=torch.float64, seed: int = 0, on_finding=None,
         max_findings: int | None = None, reach: str = "registry", on_spec=None) -> list:
    """Findings of a fuzz run: Hypothesis search rounds until ``seconds`` pass, ``max_findings``
    are found, or a round of ``max_examples`` specs finds nothing new. Each round ends at one
    shrunk, new finding. ``reach`` is as for ``spec_texts``; ``on_spec`` is called with each
    spec checked (shrinking's included)."""
    ops = ops or fuzzable_ops()
    deadline = time.monotonic() + seconds
    findings: list = []
    known: set = set()
    found: list = []  # new findings of the running round, the shrunk one last
    for round_number in range(10_000):
        if time.monotonic() > deadline or len(findings) == max_findings:
            break
        found.clear()

        @settings(max_examples=max_examples, database=None, deadline=None, verbosity=Verbosity.quiet,
                  report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
                  phases=[p for p in Phase if p is not Phase.explain])  # each rerun checks a spec
        @hypothesis_seed(seed + round_number)
        @given(spec_texts(ops, reach=reach))
        def search(text):
            if time.monotonic() > deadline:
                return
            finding = check_paths(text, paths, order, modes, dtype, seed)
            if on_spec is not None:
                on_spec(text)
            if finding is not None and finding.key not in known:
                found.append(finding)
                raise _NewFinding

        try:
            with draws_by_seed_alone():
                search()
        except Exception:  # _NewFinding, or Hypothesis's report that one did not repeat
            if not found:
                raise
            finding = found[-1]  # the shrunk one is the last that failed
            known.add(finding.key)
            findings.append(finding)
            if on_finding is not None:
                on_finding(finding)
            continue
        break
    return findings


class _NewFinding(Exception):
    pass


def save(finding: Finding, directory: Path, number: int, dtype=torch.float64) -> tuple:
    """Write the finding as ``finding-N.vspec`` (the failing point as its example) and
    ``finding-N.py`` (a torch script that shows it without verify). Returns both paths; the
    script's is None for an error of verify itself, whose spec file holds the error instead."""
    directory.mkdir(parents=True, exist_ok=True)
    failure = finding.failure
    spec_path = directory / f"finding-{number}.vspec"
    if failure is None:
        spec_path.write_text(f"# {finding.check} along {finding.path}: a bug of verify, please report it\n"
                             + "".join(f"# {line}\n" for line in finding.report.splitlines()) + finding.spec)
        return spec_path, None
    point = {name: np.asarray(value).tolist() for name, value in failure.inputs.items()
             if name in _declared(finding.spec)}
    lines = []
    for line in finding.spec.splitlines():
        name = line.split(":", 1)[0].strip()
        lines.append(f"{line} = {point[name]!r}" if ":" in line and name in point else line)
    header = (f"# {finding.kind}: {finding.check} check failed along {finding.path}; ops {', '.join(finding.ops)}\n"
              f"# sympy: {np.asarray(failure.reference).tolist()!r}\n# torch: {np.asarray(failure.actual).tolist()!r}\n")
    spec_path.write_text(header + "\n".join(lines) + "\n")
    script_path = directory / f"finding-{number}.py"
    script_path.write_text(_script(finding, dtype))
    return spec_path, script_path


def _declared(text: str) -> list:
    return [line.split(":", 1)[0].strip() for line in text.splitlines() if ":" in line]


def _script(finding: Finding, dtype) -> str:
    """Standalone torch: the spec's function as torch traced it (aten ops, by make_fx), called
    along the finding's path at the failing point, beside the exact value."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import verify

    from .report import reproduction_snippet

    failure = finding.failure
    spec = verify.parse(finding.spec)
    names = list(spec.inputs)
    dtype_name = str(dtype).replace("torch.", "")
    point = [torch.tensor(np.asarray(failure.inputs[name], dtype=np.float64), dtype=dtype) for name in names]
    traced = make_fx(_spec_function(spec))(*point)
    lines = ['"""A discrepancy between torch and the exact derivative, found by `verify fuzz`:',
             f"{finding.check} along {finding.path}, in the spec", "",
             *(f"    {line}" for line in finding.spec.splitlines()), "",
             'f is the spec\'s function as torch traced it (make_fx), op for op."""', "import torch", "",
             "torch.set_printoptions(precision=17)  # the digits where torch and the exact value part", ""]
    lines += [f"{name} = torch.tensor({buffer.tolist()!r}, dtype={buffer.dtype})"
              for name, buffer in traced.named_buffers()]
    lines += traced.code.strip().replace("def forward(self, ", "def f(").replace("self._tensor_constant",
                                                                                 "_tensor_constant").splitlines()
    lines.append("")
    if finding.path == "compile":
        lines += [f"f = torch.compile(f, backend={compile_backend()[0]!r})", ""]
    inputs = {name: failure.inputs[name] for name in names}
    tangents = {name: failure.inputs.get(f"tangent of {name}", np.ones_like(np.asarray(failure.inputs[name])))
                for name in names}
    cotangent = failure.inputs.get("cotangent", np.ones(tuple(traced(*point).shape)))  # 1 for a scalar output
    if finding.path in ("eager", "compile") or failure.check == "value":
        snippet = reproduction_snippet("f", failure.check, inputs, cotangent, tangents, dtype_name)
        lines += [line for line in snippet.splitlines() if line != "import torch"]
    else:
        def tensor(array):
            return f"torch.tensor({np.asarray(array, dtype=np.float64).tolist()!r}, dtype=torch.{dtype_name})"

        lines += [f"inputs = [{', '.join(tensor(inputs[name]) for name in names)}]",
                  f"cotangent = {tensor(cotangent)}", f"tangents = [{', '.join(tensor(tangents[n]) for n in names)}]",
                  f"argnums = tuple(range({len(names)}))", "", "def weighted(*inputs):",
                  "    return (f(*inputs) * cotangent).sum()", "", f"print({TRANSFORMED_CALLS[finding.path]})"]
    lines += [f"print('exact (sympy):', {np.asarray(failure.reference, dtype=float).tolist()!r})", ""]
    return "\n".join(lines)


# How a finding's script calls each torch.func path: the VJP (or, for func.hessian, the HVP) it computed.
TRANSFORMED_CALLS = {
    "func.vjp": "torch.func.vjp(f, *inputs)[1](cotangent)",
    "func.grad": "torch.func.grad(weighted, argnums=argnums)(*inputs)",
    "func.jacrev": "[torch.tensordot(cotangent, j, dims=cotangent.dim()) "
                   "for j in torch.func.jacrev(f, argnums=argnums)(*inputs)]",
    "func.jacfwd": "[torch.tensordot(cotangent, j, dims=cotangent.dim()) "
                   "for j in torch.func.jacfwd(f, argnums=argnums)(*inputs)]",
    "func.vmap": "[g[0] for g in torch.func.vmap(torch.func.grad(weighted, argnums=argnums))("
                 "*(torch.stack([t, t]) for t in inputs))]",
    "func.hessian": "[sum(torch.tensordot(h, t, dims=t.dim()) for h, t in zip(row, tangents)) "
                    "for row in torch.func.hessian(weighted, argnums=argnums)(*inputs)]",
}
