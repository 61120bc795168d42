"""Calibrate the allowance: torch's own kernels against the exact reference and the model.

    python benchmarks/calibration.py [--points 100000] [--ops exp,tanh] [--dtypes bfloat16]

For every registry op with a real result, in every dtype, a one-op spec runs through torch's
own kernels at many points: values, VJPs (a cotangent of the checks' directions), JVPs and, in
float64 and float32, Hessian-vector products. Each element's error |torch - exact| is divided
by the model's bound (``verify.tolerance``: u times the bound of ``verify.reference``, before
the margin ``ALLOWANCE``). One line per op, dtype and check: the points judged, the worst
ratio and where it was seen, the 99.9th percentile, the tightest bound (the smallest bound
over its exact value, in units of u: where a scale error of the gradient is best seen),
torch's own relative error (its median, in units of u), and the elements whose
allowance is at least their exact value (weak). A failure that is a recorded torch finding
(``tests/test_ops.py``, docs/findings.md) is marked, and left out of the last lines: each
dtype's worst ratio, which ``ALLOWANCE`` must exceed with its margin.

The points mix ordinary values, every magnitude the checks draw, the thresholds where exp
overflows, integers and half-integers, and the edges (0, the smallest normal number, the
largest value drawn, the ends of a domain). The exact reference is the float64 pass's where
its own error is below a hundredth of the allowance, else arb balls (the exact pass), as in
float64 always.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import verify
from tests.test_ops import torch_finding
from verify import acceptance, balls, oracle
from verify.ops import REGISTRY
from verify.plan import plan
from verify.strategies import DIRECTION_VALUES, Example, largest_drawn
from verify.subject import CodeFailure, ModeUnsupported, SpecSubject
from verify.tolerance import ALLOWANCE, UNIT_ROUNDOFF, precision

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNARY_DOMAINS = {"reciprocal": "Real", "sqrt": "Positive", "rsqrt": "Positive", "log": "Positive",
                 "log2": "Positive", "log10": "Positive", "log1p": "Interval(-1, 1e30)",
                 "tan": "Interval(-1.5, 1.5)", "asin": "Interval(-1, 1)", "acos": "Interval(-1, 1)",
                 "acosh": "Interval(1, 1e30)", "atanh": "Interval(-1, 1)", "lgamma": "Positive",
                 "digamma": "Positive"}
UNARY = ["abs", "sign", "square", "exp", "expm1", "sin", "cos", "atan", "sinh", "cosh", "tanh", "asinh", "sigmoid",
         "logsigmoid", "softplus", "relu", "elu", "gelu", "silu", "mish", "erf", "erfc", "sinc", "round",
         "floor", "ceil", "trunc", "stop_gradient", *UNARY_DOMAINS]
BINARY = {"add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b", "xlogy": "xlogy(a, b)",
          "atan2": "atan2(a, b)", "hypot": "hypot(a, b)", "maximum": "maximum(a, b)", "minimum": "minimum(a, b)"}
MATRIX = "A: Real[n, m]\n"
SPECS = {
    **{op: f"x: {UNARY_DOMAINS.get(op, 'Real')}[n]\ny = {op}(x)" for op in UNARY},
    **{op: f"a: Real[n]\nb: {'Positive' if op == 'xlogy' else 'Real'}[n]\ny = {form}" for op, form in BINARY.items()},
    "pow": "a: Positive[n]\nb: Interval(-4, 4)[n]\ny = a ** b",
    "pos": "x: Real[n]\ny = +x",
    "neg": "x: Real[n]\ny = -x",
    "where": "c: Real[n]\na: Real[n]\nb: Real[n]\ny = where(c > 0, a, b)",
    "clamp": "x: Real[n]\nlo: Real[n]\nhi: Real[n]\ny = clamp(x, lo, hi)",
    **{op: MATRIX + f"y = {op}(A, axis=1)" for op in ("sum", "mean", "prod", "amax", "amin", "logsumexp", "var",
                                                       "std", "norm")},
    **{op: MATRIX + f"y = {op}(A, axis=1)" for op in ("cumsum", "cumprod", "logcumsumexp", "softmax", "log_softmax")},
    "matmul": "A: Real[n, k]\nB: Real[k, m]\ny = A @ B",
    "transpose": "A: Real[n, m]\ny = A.T",
    "permute": "A: Real[a, b, c]\ny = permute(A, (2, 0, 1))",
    "swapaxes": "A: Real[a, b, c]\ny = swapaxes(A, 0, 2)",
    "einsum": "A: Real[b, n, k]\nB: Real[b, k, m]\ny = einsum(\"bnk,bkm->bmn\", A, B)",
    "conv1d": "x: Real[b, c, l]\nw: Real[f, c, k]\ny = conv1d(x, w)",
    "conv2d": "x: Real[1, 2, h, v]\nw: Real[2, 2, k, j]\ny = conv2d(x, w, padding=(1, 0))",
    "max_pool1d": "x: Real[c, l]\ny = max_pool1d(x, kernel=2)",
    "avg_pool1d": "x: Real[c, l]\ny = avg_pool1d(x, kernel=3, stride=1)",
    "max_pool2d": "x: Real[b, c, h, v]\ny = max_pool2d(x, kernel=2)",
    "avg_pool2d": "x: Real[b, c, h, v]\ny = avg_pool2d(x, kernel=(2, 1))",
    "dot": "x: Real[n]\nz: Real[n]\ny = dot(x, z)",
    "outer": "x: Real[n]\nz: Real[m]\ny = outer(x, z)",
    "trace": "A: Real[n, n]\ny = trace(A)",
    "diag": "A: Real[n, n]\ny = diag(A)",
    "reshape": "A: Real[n, m]\ny = reshape(A, shape=(m, n))",
    "concat": "x: Real[n]\nz: Real[m]\ny = concat(x, z)",
    "stack": "x: Real[n]\nz: Real[n]\ny = stack(x, z, axis=1)",
    "slice": "x: Real[n]\ny = x[1:]",
    "take": "z: Real[b, c]\nt: Integer(0, c)[b]\ny = take(z, t)",
    "one_hot": "z: Real[b, c]\nt: Integer(0, c)[b]\ny = one_hot(t, c) * z",
    "index": "E: Real[k, d]\nt: Integer(0, k)[n]\ny = E[t]",
    "sort": "x: Real[n]\ny = sort(x)",
    "topk": "x: Real[n]\ny = topk(x, 2)",
    "argmax": "A: Real[m, n]\ny = take(A, argmax(A, axis=1))",
    "argmin": "A: Real[m, n]\ny = take(A, argmin(A, axis=1))",
    "det": "A: Real[n, n]\ny = det(A)",
    "inv": "A: Real[n, n]\ny = inv(A)",
}
SIZES = {"n": 4, "m": 8, "k": 4, "a": 2, "b": 2, "c": 3, "f": 2, "l": 8, "h": 4, "v": 4, "j": 2, "d": 3}
CONCRETE = {"det": {"n": 2}, "inv": {"n": 2}, "conv2d": {"k": 2, "j": 2}}
ELEMENTS_PER_BATCH = 2**16
# A check of this table as the findings name it (tests/test_ops.py).
FINDING_CHECKS = {"value": "value", "VJP": "gradient", "JVP": "JVP", "HVP": "HVP"}
# Where this table cannot judge torch, and why: (op, dtype, check kind) -> the reason. Left out
# of the worst ratios, and shown.
NOT_JUDGED = {
    **{(op, torch.float64, kind): "in float64 the reference of lgamma's and digamma's derivatives is "
                                  "scipy's, tens of float64 ulps off"
       for op in ("lgamma", "digamma") for kind in ("value", "VJP", "JVP", "HVP")},
    **{("elu", dtype, "HVP"): "second order at 0, where elu' has a kink: torch takes the right side's 0"
       for dtype in (torch.float64, torch.float32)},
    **{("pow", dtype, "HVP"): "second order in the exponent at a base below the normal range: not explained yet"
       for dtype in (torch.float64, torch.float32)},
    **{("topk", dtype, kind): "ties of the k-th and (k+1)-th drawn here, where the derivative depends on the order "
                              "(rule 5 of verify.acceptance skips them; this benchmark does not apply it)"
       for dtype in DTYPES.values() for kind in ("VJP", "JVP")},
}
# The float64 reference stands in for the exact one where its own error is below this
# fraction of the model's bound (u of float64 against u of the dtype).
OWN_FRACTION = 0.01


def sample(domain, dtype: torch.dtype, shape: tuple, rng) -> np.ndarray:
    """Values of ``dtype`` inside ``domain``: ordinary ones, every magnitude, the thresholds
    where exp overflows, integers and halves, and the edges."""
    info = torch.finfo(dtype)
    size = math.prod(shape)
    kind = rng.integers(0, 6, size)
    ordinary = rng.uniform(-4, 4, size)
    largest = largest_drawn(dtype)
    magnitude = 10.0 ** rng.uniform(math.log10(info.tiny), math.log10(largest), size) * rng.choice([-1, 1], size)
    thresholds = np.array([11.0, 88.0, 89.0, 709.0, 710.0, 20.0, 30.0, 40.0, 100.0])
    near = rng.choice(thresholds, size) * rng.choice([-1, 1], size) + rng.uniform(-1, 1, size)
    halves = rng.integers(-20, 21, size) / 2.0
    edges = rng.choice([0.0, info.tiny, -info.tiny, largest, -largest, 1.0, -1.0, info.eps], size)
    low, high = domain.low, domain.high
    ends = np.where(rng.random(size) < 0.5, low, high)
    ends = np.where(np.isfinite(ends), ends, 0.0) + rng.choice([0.0, 1e-3, -1e-3, 0.5], size)
    values = np.select([kind == 0, kind == 1, kind == 2, kind == 3, kind == 4], [ordinary, magnitude, near, halves,
                                                                                  edges], ends)
    values = torch.tensor(values, dtype=torch.float64).to(dtype).double().numpy()
    fallback = torch.tensor(np.clip(rng.uniform(-4, 4, size), max(low, -4.0), min(high, 4.0)), dtype=torch.float64)
    fallback = fallback.to(dtype).double().numpy()
    valid = np.isfinite(values) & ((values == 0) | (np.abs(values) >= info.tiny)) & (np.abs(values) <= largest)
    valid &= (values > low) if domain.low_open else (values >= low)
    valid &= (values < high) if domain.high_open else (values <= high)
    return np.where(valid, values, fallback).reshape(shape)


@dataclass
class Tally:
    """The worst ratio of torch's error to the model's bound over one check's elements."""

    points: int = 0
    elements: int = 0
    worst: float = 0.0
    where: str = ""
    ratios: list = field(default_factory=list)
    weak: int = 0
    nonfinite: int = 0  # torch not finite where the exact value is finite and representable
    # The smallest bound relative to its exact value (in units of u), where a scale error is
    # best seen, and torch's own relative error (in units of u): its median, the kernel's
    # typical error (a saturated tanh' is all error, and says nothing of the rest).
    tightest: float = np.inf
    relative: list = field(default_factory=list)

    def add(self, exact, bound, actual, model, inputs: dict, batch: int) -> None:
        exact, bound, actual = (np.asarray(a, dtype=np.float64).reshape(batch, -1) for a in (exact, bound, actual))
        limit = float(torch.finfo(model.dtype).max)
        judged = np.isfinite(exact) & np.isfinite(bound) & (np.abs(exact) <= limit)
        self.nonfinite += int((judged & ~np.isfinite(actual)).sum())
        judged &= np.isfinite(actual)
        with np.errstate(all="ignore"):
            scale = model.u * bound
            error = np.abs(actual - exact)
            ratio = np.where(judged, error / scale, 0.0)
            ratio = np.where(judged & (scale == 0), np.where(actual == exact, 0.0, np.inf), ratio)
            # A result below the normal range may be flushed to 0: the rule's own floor, no ratio.
            tiny = float(torch.finfo(model.dtype).tiny)
            ratio = np.where((np.abs(exact) < tiny) & (error <= tiny), 0.0, ratio)
            self.weak += int((judged & (ALLOWANCE[model.dtype] * scale >= np.abs(exact)) & (exact != 0)).sum())
            nonzero = judged & (np.abs(exact) >= tiny)
            if nonzero.any():
                self.tightest = min(self.tightest, float(np.min(bound[nonzero] / np.abs(exact[nonzero]))))
                self.relative.append(np.median(error[nonzero] / (model.u * np.abs(exact[nonzero]))))
        self.points += int(judged.any(axis=1).sum())
        self.elements += int(judged.sum())
        if judged.any():
            self.ratios.append(np.quantile(ratio[judged], 0.999))
            worst = np.unravel_index(np.argmax(ratio), ratio.shape)
            if ratio[worst] > self.worst:
                self.worst = float(ratio[worst])
                shown = {name: np.round(array[worst[0]].ravel()[:4], 6).tolist() for name, array in inputs.items()}
                self.where = f"at {shown}, exact {exact[worst]:.6g}, torch {actual[worst]:.6g}"


def run(op: str, dtype: torch.dtype, points: int, seed: int = 0) -> dict:
    """check name -> Tally, for ``op``'s spec at ``points`` points of ``dtype``."""
    spec = verify.parse(SPECS[op])
    sizes = {name: SIZES[name] for name in spec.size_symbols}
    sizes.update(CONCRETE.get(op, {}))
    prepared = plan(spec, sizes)
    model = precision(dtype)
    subject = SpecSubject(spec, prepared.subject.program.tracked)
    output = spec.output
    elements = max(1, sum(math.prod(verify.ir.concrete_shape(d.shape, sizes)) for d in spec.inputs.values()))
    batch = max(1, min(points, ELEMENTS_PER_BATCH // elements))
    rng = np.random.default_rng(seed)
    tallies = {}
    done = 0
    while done < points:
        inputs = {}
        for name, declared in spec.inputs.items():
            shape = (batch, *verify.ir.concrete_shape(declared.shape, sizes))
            if declared.integer:
                low, high = (_at_sizes(bound, sizes) for bound in (declared.domain.low, declared.domain.high))
                inputs[name] = rng.integers(low, high, shape).astype(float)
            else:
                inputs[name] = sample(declared.domain, dtype, shape, rng)
        out_shape = (batch, *verify.ir.concrete_shape(spec.nodes[output].shape, sizes))
        cotangent = rng.choice(DIRECTION_VALUES, out_shape)
        tangents = {name: rng.choice(DIRECTION_VALUES, array.shape) if not spec.inputs[name].data
                    else np.zeros_like(array) for name, array in inputs.items()}
        example = Example(sizes, inputs, cotangent, tangents)
        _measure(prepared, subject, example, model, tallies)
        done += batch
    return tallies


def _measure(prepared, subject, example: Example, model, tallies: dict) -> None:
    dtype = model.dtype
    output = prepared.spec.output
    order = 2 if dtype in (torch.float64, torch.float32) else 1
    reference = oracle.reference_side(prepared, example, model, order=order, forward=True)
    # Only points inside every op's domain, and its derivative's (clamp at lo == hi has none).
    inside, _ = acceptance.inside_domains(prepared, example, reference.values, Counter(), model=model)
    if not inside.all():
        example = example.at(inside)
        reference = oracle.restricted(reference, inside)
        if not example.batch:
            return
    exact = _exact_where_needed(prepared, example, model, reference, order)
    value_shapes = {output: reference.values[output][0].shape[1:]}
    gradient_shapes = {name: pair[0].shape[1:] for name, pair in reference.gradients.items()
                       if name in prepared.spec.inputs}
    values, gradients, _ = subject.reverse(example, value_shapes, gradient_shapes, dtype)
    checks = [("value", exact.values[output], reference.values[output][1], values[output])]
    checks += [(f"VJP {name}", exact.gradients[name], reference.gradients[name][1], gradients[name])
               for name in gradients]
    if reference.jvp is not None:
        checks.append(("JVP", exact.jvp, reference.jvp[1], subject.forward(example, dtype)))
    if order == 2 and reference.hvps:
        products = subject.second(example, dtype, over_forward=False)
        checks += [(f"HVP {name}", exact.hvps[name], reference.hvps[name][1], products[name])
                   for name in products if name in reference.hvps]
    for check, exact_value, bound, actual in checks:
        tallies.setdefault(check, Tally()).add(exact_value, bound, actual, model, example.inputs, example.batch)


def _exact_where_needed(prepared, example: Example, model, reference, order: int):
    """The reference side with exact values: the float64 pass's, but at points where its own
    error could matter (float64, or a bound that is not finite), arb's midpoints."""
    needs = np.zeros(example.batch, dtype=bool)
    for value, bound in reference.pairs():
        bound = np.asarray(bound, dtype=np.float64).reshape(example.batch, -1)
        own = UNIT_ROUNDOFF[torch.float64] * bound / min(model.kernel_ratio, 1.0)
        needs |= ~np.all(np.isfinite(bound) & (own <= OWN_FRACTION * model.u * bound), axis=1)
    positions = np.flatnonzero(needs)
    exact_side = _in_balls(prepared, example.at(needs), model, order) if needs.any() else None
    if exact_side is None:  # none replaced, or none exact: NaN there (not judged)
        exact_side = reference.combined(reference, lambda pair, _: np.nan if needs.any() else None)

    def merged(pair, exact_value):
        value = np.array(pair[0], dtype=np.float64, copy=True)
        if exact_value is not None:
            value[positions] = exact_value
        return value

    return oracle.ReferenceSide(  # values alone
        {name: merged(pair, exact_side.values[name]) for name, pair in reference.values.items()},
        {name: merged(pair, exact_side.gradients[name]) for name, pair in reference.gradients.items()},
        reference.claimed, None if reference.jvp is None else merged(reference.jvp, exact_side.jvp),
        {name: merged(pair, exact_side.hvps[name]) for name, pair in reference.hvps.items()})


def _in_balls(prepared, example: Example, model, order: int):
    """Exact midpoints (NaN where 256 bits leave a ball unsettled) at every point of ``example``:
    all at once, or point by point where a comparison is undecided at one of them."""
    try:
        with balls.precision(256), balls.exactly():
            side, _ = oracle._evaluated(prepared, example, model, order, True)
    except (balls.Undecided, balls.Beyond):
        if example.batch == 1:
            return None
        sides = [_in_balls(prepared, example.at(np.arange(example.batch) == k), model, order)
                 for k in range(example.batch)]
        return _joined(sides, example)

    def midpoints(pair):
        value = pair[0]
        settled = np.frompyfunc(lambda b: balls.settled([np.array([b], dtype=object)]), 1, 1)(value).astype(bool)
        return np.where(settled, balls.to_float(value), np.nan)

    return oracle.ReferenceSide({n: midpoints(p) for n, p in side.values.items()},
                                {n: midpoints(p) for n, p in side.gradients.items()}, [],
                                None if side.jvp is None else midpoints(side.jvp),
                                {n: midpoints(p) for n, p in side.hvps.items()})


def _joined(sides: list, example: Example):
    """Per-point sides as one; a point with no exact side is NaN throughout (None: none has one)."""
    template = next((side for side in sides if side is not None), None)
    if template is None:
        return None

    def stacked(pick):
        return np.concatenate([np.full((1, *np.shape(pick(template))[1:]), np.nan) if side is None else pick(side)
                               for side in sides])

    return oracle.ReferenceSide(
        {n: stacked(lambda side, n=n: side.values[n]) for n in template.values},
        {n: stacked(lambda side, n=n: side.gradients[n]) for n in template.gradients}, [],
        None if template.jvp is None else stacked(lambda side: side.jvp),
        {n: stacked(lambda side, n=n: side.hvps[n]) for n in template.hvps})


def _at_sizes(bound, sizes: dict) -> int:
    """An integer input's bound, which may name a size (take's index below n), at ``sizes``."""
    if hasattr(bound, "free_symbols"):
        bound = bound.xreplace({symbol: sizes[symbol.name] for symbol in bound.free_symbols})
    return int(bound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--ops", help="comma-separated op names (default: every op with a real result)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args()
    ops = args.ops.split(",") if args.ops else [op for op in SPECS if REGISTRY[op].result == "real"]
    worst = {}
    print(f"{'op':14} {'dtype':9} {'check':10} {'points':>8} {'worst':>9} {'p99.9':>8} {'tightest':>8} "
          f"{'torch':>8} {'weak':>7} {'inf/nan':>7}  seconds  where")
    for op in ops:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            started = time.perf_counter()
            try:
                tallies = run(op, dtype, args.points)
            except (ModeUnsupported, CodeFailure) as error:  # torch has no such kernel (lu, inv in bfloat16)
                print(f"{op:14} {dtype_name:9} {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
                continue
            seconds = time.perf_counter() - started
            for check, tally in tallies.items():
                p999 = max(tally.ratios, default=0.0)
                finding = torch_finding(op, dtype, FINDING_CHECKS[check.split()[0]])
                aside = NOT_JUDGED.get((op, dtype, check.split()[0]))
                if not finding and not aside and tally.worst > worst.get(dtype_name, (0.0, ""))[0]:
                    worst[dtype_name] = (tally.worst, f"{op} {check}")
                print(f"{op:14} {dtype_name:9} {check:10} {tally.points:8} {tally.worst:9.3g} {p999:8.3g} "
                      f"{tally.tightest:8.3g} {max(tally.relative, default=0.0):8.3g} {tally.weak:7} "
                      f"{tally.nonfinite:7}  {seconds:7.1f}  {'(a torch finding) ' if finding else ''}"
                      f"{f'(not judged: {aside}) ' if aside else ''}{tally.where}",
                      flush=True)
    print()
    for dtype_name, (ratio, where) in worst.items():
        print(f"worst ratio in {dtype_name}, torch's findings aside: {ratio:.3g} ({where}); "
              f"ALLOWANCE is {ALLOWANCE[DTYPES[dtype_name]]:g}")


if __name__ == "__main__":
    main()
