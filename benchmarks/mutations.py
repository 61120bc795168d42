"""Measure the allowance's power: torch's own backward must pass, and its mutants must die.

    python benchmarks/mutations.py [--examples 100] [--ops tanh,exp] [--dtypes bfloat16] [--classes zero,flip]

For every registry op with a derivative, torch's own backward is wrapped as a custom Function
(forward and backward by torch's kernels, in the dtype under test) and checked with
``verify.check_function`` against the op's one-op spec (``benchmarks/calibration.py``). It must
pass. Beside it run mutants of the same backward:

* ``zero``: the gradient is 0 where an input's magnitude passes a threshold, in a range where
  the derivative is still many times torch's own error;
* ``flip``: its sign flipped there;
* ``scale``: the whole gradient times 1 + 8u (u the dtype's unit roundoff), or 1 + 4e where
  torch's own backward is typically off by e > 2u (its median relative error, from
  benchmarks/calibration.py);
* ``drop``: a reduction's backward without one of its terms (softmax's ``- sum(g * s)``,
  layer norm's term through the variance, ...);
* ``nan-patch``: a naive backward that overflows, patched with ``nan_to_num``, against the
  spec written the way users write it (``log(1 + exp(x))``);
* ``overflow``: a backward whose steps overflow where the gradient is representable.

Each mutant must be caught. The output gives one line per run, then the kill rate per class
and dtype, the false alarms (torch's own backward failing where that is no recorded finding of
docs/findings.md), and the detection floor: the
smallest scale error (in units of u) caught on each op, per dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibration
from calibration import SPECS

import verify
from tests.test_ops import torch_finding
from verify import engine
from verify.lower.torch import TorchProgram
from verify.ops import REGISTRY
from verify.plan import labelled_nodes
from verify.tolerance import UNIT_ROUNDOFF

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Ops whose derivative is 0 everywhere, or that select without arithmetic: a zeroed or flipped
# gradient there is no mutant, or no different one from the identity's.
NO_DERIVATIVE = {"sign", "round", "floor", "ceil", "trunc", "stop_gradient", "argmax", "argmin", "one_hot"}
# Where the zero and flip mutants act: inputs past this magnitude (inside each op's domain).
THRESHOLDS = {"asin": 0.5, "acos": 0.5, "atanh": 0.5, "tan": 0.5, "acosh": 2.0}
DEFAULT_THRESHOLD = 1.0
SCALE_ULPS = 8
CALIBRATION_POINTS = 2000
FLOOR_ULPS = (1, 2, 4, 8, 16, 32, 64, 128)


def _sizes(spec, tensors: list) -> dict:
    sizes = {}
    for declared, tensor in zip(spec.inputs.values(), tensors):
        for dim, length in zip(declared.shape, tensor.shape[1:]):
            if not isinstance(dim, int):
                sizes[dim.name] = int(length)
    return sizes


def torch_function(spec_text: str):
    """The spec's own torch lowering as a function of stacked points (``rows=True``)."""
    spec = verify.parse(spec_text)
    program = TorchProgram(spec, labelled_nodes(spec))

    def fn(*tensors):
        dtype = next(t.dtype for t in tensors if t.is_floating_point())
        return program.run(dict(zip(spec.inputs, tensors)), _sizes(spec, tensors), dtype, retain=False)[spec.output]

    return fn


def wrapped(fn, mutate=None):
    """``fn`` as a custom Function whose backward is torch's own, passed through ``mutate(grads,
    inputs, grad_output)``."""
    class Own(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
                output = fn(*leaves)
            ctx.leaves, ctx.output = leaves, output
            return output.detach()

        @staticmethod
        def backward(ctx, grad_output):
            wrt = [leaf for leaf in ctx.leaves if leaf.requires_grad]
            grads = torch.autograd.grad(ctx.output, wrt, grad_output, allow_unused=True)
            grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, wrt)]
            if mutate is not None:
                grads = mutate(grads, [leaf.detach() for leaf in wrt], grad_output)
            found = iter(grads)
            return tuple(next(found) if leaf.requires_grad else None for leaf in ctx.leaves)

    return Own.apply


def masked(threshold: float, change):
    def mutate(grads, inputs, grad_output):
        return [torch.where(x.abs() > threshold, change(g), g) for g, x in zip(grads, inputs)]
    return mutate


def scaled(factor: float):
    def mutate(grads, inputs, grad_output):
        return [g * factor for g in grads]
    return mutate


@dataclass(frozen=True)
class Mutant:
    kind: str
    op: str
    spec: str
    fn: object
    dtypes: tuple = tuple(DTYPES)


def _custom(forward, backward):
    """A Function of one input from a forward and a backward(x, y, g) -> gradient."""
    class Custom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = forward(x)
            ctx.save_for_backward(x, y)
            return y

        @staticmethod
        def backward(ctx, g):
            x, y = ctx.saved_tensors
            return backward(x, y, g)

    return Custom.apply


ROW = "x: Real[n]\n"
LAYER_NORM = ROW + "mu = mean(x)\nv = mean((x - mu) ** 2)\ny = (x - mu) / sqrt(v + 1/100000)"


def _layer_norm_backward(x, y, g, with_variance: bool):
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    xhat = (x - mu) / sigma
    dx = g - g.mean(-1, keepdim=True)
    if with_variance:
        dx = dx - xhat * (g * xhat).mean(-1, keepdim=True)
    return dx / sigma


def _layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)


def special_mutants() -> list:
    """The drop, nan-patch and overflow mutants: each a Function against the spec of its math."""
    last = -1
    mutants = [
        Mutant("drop", "softmax", "A: Real[n, m]\ny = softmax(A, axis=1)",
               _custom(lambda x: torch.softmax(x, last), lambda x, y, g: y * g)),
        Mutant("drop", "log_softmax", "A: Real[n, m]\ny = log_softmax(A, axis=1)",
               _custom(lambda x: torch.log_softmax(x, last), lambda x, y, g: g)),
        Mutant("drop", "logsumexp", ROW + "y = logsumexp(x)",
               _custom(lambda x: torch.logsumexp(x, last), lambda x, y, g: g.unsqueeze(-1) * torch.exp(x))),
        Mutant("drop", "logcumsumexp", "A: Real[n, m]\ny = logcumsumexp(A, axis=1)",
               _custom(lambda x: torch.logcumsumexp(x, last), lambda x, y, g: g * torch.exp(x - y))),
        Mutant("drop", "layer norm", LAYER_NORM,
               _custom(_layer_norm, lambda x, y, g: _layer_norm_backward(x, y, g, with_variance=False))),
        Mutant("drop", "var", ROW + "y = var(x)",
               _custom(lambda x: torch.var(x, last), lambda x, y, g: g.unsqueeze(-1) * 2 * x / (x.shape[-1] - 1))),
        Mutant("drop", "std", ROW + "y = std(x)",
               _custom(lambda x: torch.std(x, last),
                       lambda x, y, g: (g / y).unsqueeze(-1) * x / (x.shape[-1] - 1))),
        Mutant("drop", "norm", ROW + "y = norm(x)",
               _custom(lambda x: torch.linalg.vector_norm(x, dim=last), lambda x, y, g: g.unsqueeze(-1) * x)),
        Mutant("nan-patch", "softplus", ROW + "y = log(1 + exp(x))",
               _custom(_softplus, lambda x, y, g: g * torch.nan_to_num(torch.exp(x) / (1 + torch.exp(x))))),
        Mutant("nan-patch", "sigmoid", ROW + "y = 1 / (1 + exp(-x))",
               _custom(torch.sigmoid,
                       lambda x, y, g: g * torch.nan_to_num(torch.exp(-x) / (1 + torch.exp(-x)) ** 2))),
        Mutant("nan-patch", "logsumexp", ROW + "y = log(sum(exp(x)))",
               _custom(lambda x: torch.logsumexp(x, last), lambda x, y, g: g.unsqueeze(-1) * torch.nan_to_num(
                   torch.exp(x) / torch.exp(x).sum(last, keepdim=True)))),
        Mutant("nan-patch", "softmax", ROW + "y = exp(x) / sum(exp(x))",
               _custom(lambda x: torch.softmax(x, last), lambda x, y, g: _softmax_backward(
                   torch.nan_to_num(torch.exp(x) / torch.exp(x).sum(last, keepdim=True)), g))),
        Mutant("nan-patch", "log_softmax", ROW + "y = x - log(sum(exp(x)))",
               _custom(lambda x: torch.log_softmax(x, last), lambda x, y, g: g - torch.nan_to_num(
                   torch.exp(x) / torch.exp(x).sum(last, keepdim=True)) * g.sum(last, keepdim=True))),
        Mutant("overflow", "cube", ROW + "y = x ** 3",
               _custom(lambda x: x ** 3, lambda x, y, g: g * 3 * x * x * x / x)),
        Mutant("overflow", "softplus", ROW + "y = log(1 + exp(x))",
               _custom(_softplus, lambda x, y, g: g * torch.exp(x) / (1 + torch.exp(x)))),
        Mutant("overflow", "sigmoid", ROW + "y = 1 / (1 + exp(-x))",
               _custom(torch.sigmoid, lambda x, y, g: g * torch.exp(-x) / (1 + torch.exp(-x)) ** 2)),
        Mutant("overflow", "logsumexp", ROW + "y = log(sum(exp(x)))",
               _custom(lambda x: torch.logsumexp(x, last),
                       lambda x, y, g: g.unsqueeze(-1) * torch.exp(x) / torch.exp(x).sum(last, keepdim=True))),
    ]
    return mutants


def _softplus(x):
    """log(1 + exp(x)) to the dtype's precision (F.softplus returns x past 20, 2e-9 off)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _softmax_backward(s, g):
    return s * (g - (g * s).sum(-1, keepdim=True))


def kernel_error_ulps(op: str, dtype: torch.dtype) -> float:
    """torch's own backward's typical relative error on ``op``, in units of u: its median over
    ``CALIBRATION_POINTS`` points of benchmarks/calibration.py."""
    tallies = calibration.run(op, dtype, CALIBRATION_POINTS)
    return max((max(tally.relative, default=0.0) for check, tally in tallies.items() if check.startswith("VJP")),
               default=0.0)


def op_mutants(op: str, dtype: torch.dtype, classes) -> list:
    """(kind, fn, scale in units of u or None) for ``op``, of ``classes``: torch's own backward,
    and its zero, flip and scale mutants; the scale is 8u, or 4 times torch's own error where
    that is larger (measured only where a scale mutant runs)."""
    fn = torch_function(SPECS[op])
    threshold = THRESHOLDS.get(op, DEFAULT_THRESHOLD)
    found = [("own", wrapped(fn), None)]
    if op not in NO_DERIVATIVE:
        found += [("zero", wrapped(fn, masked(threshold, torch.zeros_like)), None),
                  ("flip", wrapped(fn, masked(threshold, torch.neg)), None)]
        if "scale" in classes:
            ulps = max(SCALE_ULPS, 4 * kernel_error_ulps(op, dtype))
            found.append(("scale", wrapped(fn, scaled(1 + ulps * UNIT_ROUNDOFF[dtype])), ulps))
    return [mutant for mutant in found if mutant[0] in classes]


def verdict(fn, spec: str, dtype: torch.dtype, examples: int, rows: bool) -> tuple:
    """("caught" or "passed" or what else came of it, seconds)."""
    started = time.perf_counter()
    try:
        verify.check_function(fn, spec, dtype=dtype, modes=("rev",), max_examples=examples, seed=0, rows=rows)
        outcome = "passed"
    except verify.Mismatch as mismatch:
        outcome = "caught: " + str(mismatch).splitlines()[0].split(": ", 1)[-1]
    except verify.VerifyError as error:
        outcome = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return outcome, time.perf_counter() - started


def detection_floor(op: str, dtype: torch.dtype, examples: int) -> int | None:
    """The smallest scale error (in units of u) caught on ``op``'s spec, of FLOOR_ULPS."""
    fn = torch_function(SPECS[op])
    for ulps in FLOOR_ULPS:
        outcome, _ = verdict(wrapped(fn, scaled(1 + ulps * UNIT_ROUNDOFF[dtype])), SPECS[op], dtype, examples, True)
        if outcome.startswith("caught"):
            return ulps
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--ops", help="comma-separated op names (default: every op with a derivative)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--classes", default="own,zero,flip,scale,drop,nan-patch,overflow,floor")
    args = parser.parse_args()
    # The verdict is what is measured, not how small the counterexample.
    engine.SHRINK_SECONDS = 0.0
    engine.SIMPLIFY_SECONDS = 0.0
    classes = set(args.classes.split(","))
    dtypes = args.dtypes.split(",")
    ops = args.ops.split(",") if args.ops else [op for op in SPECS if REGISTRY[op].result == "real"
                                                 and op not in ("det", "inv")]
    tally = defaultdict(lambda: [0, 0])  # (kind, dtype) -> [caught, runs]
    false_alarms, floors = [], defaultdict(dict)
    print(f"{'kind':10} {'op':14} {'dtype':9} {'seconds':>7}  outcome")
    for op in ops:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for kind, fn, ulps in op_mutants(op, dtype, classes):
                outcome, seconds = verdict(fn, SPECS[op], dtype, args.examples, rows=True)
                if kind == "own" and outcome.startswith("caught") and torch_finding(op, dtype, _check(outcome)):
                    outcome = "a torch finding (docs/findings.md): " + outcome
                shown = kind if ulps is None else f"{kind} {ulps:.3g}u"
                print(f"{shown:10} {op:14} {dtype_name:9} {seconds:7.1f}  {outcome}", flush=True)
                _count(tally, false_alarms, kind, op, dtype_name, outcome)
            if "floor" in classes and op not in NO_DERIVATIVE:
                floors[dtype_name][op] = detection_floor(op, dtype, args.examples)
    for mutant in special_mutants():
        if mutant.kind not in classes or (args.ops and mutant.op not in args.ops.split(",")):
            continue
        for dtype_name in dtypes:
            outcome, seconds = verdict(mutant.fn, mutant.spec, DTYPES[dtype_name], args.examples, rows=True)
            print(f"{mutant.kind:10} {mutant.op:14} {dtype_name:9} {seconds:7.1f}  {outcome}", flush=True)
            _count(tally, false_alarms, mutant.kind, mutant.op, dtype_name, outcome)
    print()
    print(f"{'class':10} " + " ".join(f"{d:>14}" for d in dtypes))
    for kind in ("zero", "flip", "scale", "drop", "nan-patch", "overflow"):
        if any((kind, d) in tally for d in dtypes):
            cells = [f"{tally[kind, d][0]}/{tally[kind, d][1]}" for d in dtypes]
            print(f"{kind:10} " + " ".join(f"{c:>14}" for c in cells))
    own = [f"{tally['own', d][1] - tally['own', d][0]}/{tally['own', d][1]}" for d in dtypes]
    print(f"{'own passes':10} " + " ".join(f"{c:>14}" for c in own))
    print(f"false alarms: {len(false_alarms)}" + "".join(f"\n  {line}" for line in false_alarms))
    for dtype_name, per_op in floors.items():
        caught = sorted(v for v in per_op.values() if v is not None)
        missed = [op for op, v in per_op.items() if v is None]
        if caught:
            print(f"detection floor in {dtype_name}: {caught[0]}u at best, {caught[len(caught) // 2]}u median, "
                  f"{caught[-1]}u at worst over {len(caught)} ops" + (f"; not caught at {FLOOR_ULPS[-1]}u: "
                                                                    f"{', '.join(missed)}" if missed else ""))


def _check(outcome: str) -> str:
    """The check a "caught: ..." outcome names, as the findings name it."""
    return outcome.split("caught: ", 1)[-1].split(" check failed", 1)[0]


def _count(tally, false_alarms: list, kind: str, op: str, dtype_name: str, outcome: str) -> None:
    caught = outcome.startswith("caught") or (kind != "own" and not outcome.startswith("passed"))
    tally[kind, dtype_name][1] += 1
    tally[kind, dtype_name][0] += caught
    if kind == "own" and not outcome.startswith(("passed", "a torch finding")):
        false_alarms.append(f"{op} {dtype_name}: {outcome}")


if __name__ == "__main__":
    main()
