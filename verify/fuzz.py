"""Fuzz mode: random specs from the op registry, checked against sympy through several AD paths.

Hypothesis draws well-typed specs (compositions of registry ops, depth 1 to 4, over one or two
inputs that broadcast), and each is checked through:

* ``eager``: torch's autograd on the spec's lowering (values, VJPs, JVPs by forward AD, and
  with ``order2`` Hessian-vector products by double backward and forward over reverse);
* ``func.vjp``, ``func.grad``, ``func.jacrev``, ``func.jacfwd``: the same function, with its
  backward computed by those ``torch.func`` transforms (jacrev is vmap over vjp, jacfwd vmap
  over jvp), and with ``order2`` differentiated again by autograd;
* ``func.vmap``: the backward is ``vmap(grad(f))`` over a batch of copies of the point, so
  torch's batching rules are checked too;
* ``func.hessian`` (with ``order2`` only): Hessian-vector products from ``torch.func.hessian``.

Points where the math is undefined, kinks, ties and untaken ``where`` branches are rejected by
the engine under the registry's rules, so a finding is a discrepancy at a point where the math is
well defined. Hypothesis shrinks the spec, the engine the input. Findings are deduplicated by op
set, check and AD path, and each is saved as a ``.vspec`` with the failing point as its example,
plus a standalone torch script that shows it without verify.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from .errors import Mismatch, SpecError, Unchecked
from .ops import REGISTRY
from .strategies import draws_by_seed_alone

PATHS = ("eager", "func.vjp", "func.grad", "func.jacrev", "func.jacfwd", "func.vmap", "func.hessian")
SECOND_ORDER_PATHS = ("func.hessian",)  # the same as func.vjp at first order
BINARY = ("+", "-", "*", "/")
INNER_EXAMPLES = 10


def fuzzable_ops() -> list:
    """One-argument elementwise ops of the registry that torch names the same way, so that a
    finding's standalone script can call them."""
    return sorted(name for name, op in REGISTRY.items()
                  if op.kind == "elementwise" and op.arity == 1 and not op.params and op.result == "real"
                  and _torch_name(name))


def _torch_name(name: str) -> str | None:
    homes = {"torch": torch, "torch.special": torch.special, "torch.nn.functional": torch.nn.functional}
    return next((f"{home}.{name}" for home, module in homes.items() if hasattr(module, name)), None)


@st.composite
def spec_texts(draw, ops: list, max_depth: int = 4) -> str:
    """A spec: one or two inputs (y may be a matrix that broadcasts against x), an expression
    of ``ops`` and + - * / up to ``max_depth`` deep, and its sum or the tensor as the output."""
    names = ["x"] + (["y"] if draw(st.booleans(), label="two inputs") else [])
    declarations = ["x: Real[n]"]
    if "y" in names:
        declarations.append(draw(st.sampled_from(["y: Real[n]", "y: Real[m, n]", "y: Real"]), label="y"))

    def expression(depth: int) -> str:
        if depth == 0 or draw(st.integers(0, 3), label="leaf") == 0:
            return draw(st.sampled_from(names), label="input")
        if draw(st.booleans(), label="binary"):
            operator = draw(st.sampled_from(BINARY), label="operator")
            return f"({expression(depth - 1)} {operator} {expression(depth - 1)})"
        return f"{draw(st.sampled_from(ops), label='op')}({expression(depth - 1)})"

    depth = draw(st.integers(1, max_depth), label="depth")
    body = expression(depth)
    if not any(name in body for name in names):
        body = f"{body} + x"
    output = f"sum({body})" if draw(st.booleans(), label="summed") else f"{body} + 0 * x"
    return "\n".join(declarations + [f"o = {output}"]) + "\n"


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
            else:
                # Forward mode is torch.func's inside jacfwd (vmap of jvp); the Function has no jvp.
                verify.check_function(transformed(spec, path), spec, seed=seed, dtype=dtype, order=order,
                                      modes=("rev",), max_examples=max_examples)
        except Mismatch as mismatch:
            ops = tuple(sorted(_called(text) | {b for b in BINARY if f" {b} " in text}))
            return Finding(text, path, mismatch.failure.check, ops, str(mismatch), mismatch.failure)
        except (Unchecked, SpecError):
            continue  # nothing checkable here (every point undefined): no finding, and no pass
        except Exception as error:  # noqa: BLE001 - a bug of verify itself: a finding about the tool
            return Finding(text, path, f"verify raised {type(error).__name__}", (), f"{type(error).__name__}: {error}",
                           None)
    return None


def _called(text: str) -> set:
    """The functions a spec's text calls."""
    return set(re.findall(r"\b(\w+)\(", text))


def transformed(spec, path: str):
    """The spec's function of its inputs, as an autograd.Function whose backward is computed by
    the torch.func transform ``path``."""
    from .subject import SpecSubject

    program = SpecSubject(spec, {spec.nodes[spec.output]: spec.output}).program
    names = list(spec.inputs)

    def function(*tensors):
        sizes = _sizes(spec, tensors)
        batched = {name: t.unsqueeze(0) for name, t in zip(names, tensors)}  # the program runs on batches
        return program.run(batched, sizes, tensors[0].dtype, retain=False)[spec.output][0]

    argnums = tuple(range(len(names)))

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
         max_findings: int | None = None) -> list:
    """Findings of a fuzz run: Hypothesis search rounds until ``seconds`` pass, ``max_findings``
    are found, or a round of ``max_examples`` specs finds nothing new. Each round ends at one
    shrunk, new finding."""
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
        @given(spec_texts(ops))
        def search(text):
            if time.monotonic() > deadline:
                return
            finding = check_paths(text, paths, order, modes, dtype, seed)
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
    header = (f"# {finding.check} check failed along {finding.path}; ops {', '.join(finding.ops)}\n"
              f"# sympy: {np.asarray(failure.reference).tolist()!r}\n# torch: {np.asarray(failure.actual).tolist()!r}\n")
    spec_path.write_text(header + "\n".join(lines) + "\n")
    script_path = directory / f"finding-{number}.py"
    script_path.write_text(_script(finding, dtype))
    return spec_path, script_path


def _declared(text: str) -> list:
    return [line.split(":", 1)[0].strip() for line in text.splitlines() if ":" in line]


def _script(finding: Finding, dtype) -> str:
    """Standalone torch: the spec's expression with torch's functions, at the failing point."""
    failure = finding.failure
    names = _declared(finding.spec)
    expression = next(line for line in finding.spec.splitlines() if line.startswith("o = "))[4:]
    functions = sorted(_called(expression) - {"sum"})
    lines = ['"""A discrepancy between torch and the exact derivative, found by `verify fuzz`."""', "import torch",
             "torch.set_printoptions(precision=17)  # the digits where torch and the exact value part", ""]
    lines += [f"{op} = {_torch_name(op)}" for op in functions]
    lines += ["sum = torch.sum", "", f"def f({', '.join(names)}):", f"    return {expression}", ""]
    dtype_name = str(dtype).replace("torch.", "")
    inputs = {name: failure.inputs[name] for name in names}
    tangents = {name: failure.inputs.get(f"tangent of {name}", np.ones_like(np.asarray(failure.inputs[name])))
                for name in names}
    cotangent = failure.inputs.get("cotangent", np.ones_like(np.asarray(failure.reference, dtype=float)))
    from .report import reproduction_snippet

    snippet = reproduction_snippet("f", failure.check, inputs, cotangent, tangents, dtype_name)
    lines += [line for line in snippet.splitlines() if line != "import torch"]
    lines += [f"print('exact (sympy):', {np.asarray(failure.reference, dtype=float).tolist()!r})", ""]
    return "\n".join(lines)
