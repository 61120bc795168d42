"""Points verified per second: verify against torch.autograd.gradcheck, in one run.

    python benchmarks/speed.py [--sizes 2,100,10000,1000000] [--seconds 2]

On o = 1/2 * sum(sin(x)**2 * exp(x)) at each size n it prints:

* verify's points per second: points where values, VJPs and JVPs were checked, over the
  wall time of ``verify.check(..., sizes={"n": n})`` after the sympy work (which is cached);
* gradcheck's points per second on the same function in float64 (each call checks one point
  with 2n forward passes), where one call finishes within the time budget;
* the ratio of the two;
* verify's time per point over a bare torch forward+backward of the same batch, and the two
  parts of a check that no tolerance or draw can avoid, on the same scale: torch's own part
  (forward, backward with every node's gradient kept, forward-mode JVP) and the reference's
  first pass (values, VJPs and JVPs in numpy, with the floors of their error bounds).

Then the one-time sympy cost (parse, differentiate, prove, compile) at n = 10 and n = 10**6,
the wall time of a whole default check (100 examples) at n = 10**6, sympy work included, and,
for the benchmark spec and a few realistic ones, how many points each pass settled: how
many needed the exact pass, and how many it left unjudged.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import verify
from verify import oracle
from verify import plan as planning
from verify.ir import concrete_shape
from verify.strategies import Example, points_per_example
from verify.tolerance import precision

SPEC = "x: Real[n]\no = 1/2 * sum(sin(x)**2 * exp(x))"
# Realistic specs, written the way users write them, for the share of the exact pass.
REALISTIC = {
    "layer norm": "x: Real[n]\nm = sum(x) / n\nd = x - m\nv = sum(d**2) / n\no = sum(d / sqrt(v + 1/100000))",
    "MLP": "W: Real[m, n]\nx: Real[n]\nh = tanh(W @ x)\no = sum(h**2)",
    "softmax, naive": "x: Real[n]\ny = exp(x) / sum(exp(x))",
    "attention": "q: Real[n]\nK: Real[m, n]\nV: Real[m, n]\na = softmax(K @ q)\no = sum(a @ V)",
}


def function(x):
    return 0.5 * (torch.sin(x) ** 2 * torch.exp(x)).sum(dim=-1)


def verify_rate(spec, n: int, seconds: float) -> tuple:
    """(points per second, points, seconds) of verify.check at size n, examples growing until
    the run takes ``seconds``."""
    verify.check(spec, sizes={"n": n}, seed=0, max_examples=1)  # the sympy work, then cached
    examples = 4
    while True:
        started = time.perf_counter()
        result = verify.check(spec, sizes={"n": n}, seed=0, max_examples=examples)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds or examples >= 1000:
            return result.points / elapsed, result.points, elapsed
        examples = min(1000, max(examples * 2, int(examples * seconds / max(elapsed, 1e-3))))


def gradcheck_rate(n: int, seconds: float) -> float | None:
    """gradcheck's points per second, or None when one call would not finish in ``seconds``."""
    # 2n forward passes per call: estimate one from a timed forward first.
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    started = time.perf_counter()
    function(x)
    if 2 * n * (time.perf_counter() - started) > 10 * seconds:
        return None
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.autograd.gradcheck(function, (torch.randn(n, dtype=torch.float64, requires_grad=True),))
        calls += 1
    return calls / (time.perf_counter() - started)


def bare_torch_seconds_per_point(spec, n: int) -> float:
    """A forward and backward of the same batch verify evaluates per example, per point."""
    batch = points_per_example(spec, {"n": n})
    x = torch.randn(batch, n, dtype=torch.float64, requires_grad=True)
    return _seconds(lambda: function(x).sum().backward()) / batch


def shares_of_a_check(spec, n: int) -> tuple:
    """Per point of the same batch, over a bare forward and backward: (torch's own part of a
    check: forward and backward with every node's gradient kept, and a forward-mode JVP; the
    reference's first pass: values, VJPs and JVPs without error bounds, with the bounds' floors)."""
    prepared = planning.plan(spec, {"n": n})
    batch = points_per_example(spec, {"n": n})
    rng = np.random.default_rng(0)
    example = Example({"n": n}, {"x": rng.uniform(-10, 10, (batch, n))}, rng.choice([1.0, -2.0], batch),
                      {"x": rng.choice([1.0, -2.0], (batch, n))})
    shapes = {name: concrete_shape(ref.tensor.shape, example.sizes) for name, ref in prepared.values.items()}
    gradient_shapes = {name: concrete_shape(ref.tensor.shape, example.sizes) for name, ref in prepared.gradients.items()}

    def torch_part():
        prepared.subject.reverse(example, shapes, gradient_shapes, torch.float64)
        prepared.subject.forward(example, torch.float64)

    def reference_pass():
        ctx, values = oracle.reference_values(prepared, example, precision(torch.float64), bounded=False)
        oracle.reference_derivatives(prepared, example, ctx, values, 1, True, bounded=False)

    bare = bare_torch_seconds_per_point(spec, n) * batch
    return tuple(_seconds(part) / bare for part in (torch_part, reference_pass))


def _seconds(call) -> float:
    call()
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.5:
        call()
        repeats += 1
    return (time.perf_counter() - started) / repeats


def sympy_seconds(n: int) -> float:
    """The sympy work of the spec at size n, from scratch (caches cleared)."""
    planning.forget_plans()
    started = time.perf_counter()
    spec = verify.parse(SPEC)
    planning.plan(spec, {"n": n})
    return time.perf_counter() - started


def whole_check_seconds(n: int) -> tuple:
    """(seconds, examples, points) of ``verify.check`` with default settings at size n, from
    the spec's text, caches cleared."""
    planning.forget_plans()
    started = time.perf_counter()
    result = verify.check(SPEC, sizes={"n": n}, seed=0)
    return time.perf_counter() - started, result.examples, result.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,100,1000,10000,1000000")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"spec: {SPEC!r}, float64, verify checks values, VJPs and JVPs\n")
    spec = verify.parse(SPEC)
    rows = [("n", "verify pts/s", "gradcheck pts/s", "ratio", "verify / bare torch", "torch part", "reference pass",
             "points", "seconds")]
    for n in map(int, args.sizes.split(",")):
        rate, points, elapsed = verify_rate(spec, n, args.seconds)
        reference = gradcheck_rate(n, args.seconds)
        per_point = 1 / rate if rate else float("inf")
        overhead = per_point / bare_torch_seconds_per_point(spec, n)
        torch_part, reference_pass = shares_of_a_check(spec, n)
        rows.append((f"{n}", f"{rate:,.1f}", "does not finish" if reference is None else f"{reference:,.2f}",
                     "" if reference is None else f"{rate / reference:,.0f}x", f"{overhead:,.0f}x",
                     f"{torch_part:,.1f}x", f"{reference_pass:,.1f}x", f"{points}", f"{elapsed:.1f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print()
    for n in (10, 10**6):
        print(f"sympy work at n = {n}: {sympy_seconds(n):.3f} s")
    seconds, examples, points = whole_check_seconds(10**6)
    print(f"a default check at n = 1000000, sympy work included: {seconds:.1f} s "
          f"({examples} examples, {points} points checked; the other examples overflow or underflow)")
    print()
    exact_pass_shares()


def exact_pass_shares() -> None:
    """Per spec and dtype, of a default check (seed 0): points checked, of them judged by the
    exact pass, points left unjudged by it, points rejected, and seconds."""
    rows = [("spec", "dtype", "checked", "exact pass", "share", "left unjudged", "rejected", "seconds")]
    for name, spec in {"benchmark": SPEC, **REALISTIC}.items():
        for dtype in (torch.float64, torch.float32):
            started = time.perf_counter()
            result = verify.check(spec, seed=0, dtype=dtype)
            exact = result.exact["judged by the exact pass"]
            left = sum(count for what, count in result.exact.items() if what.startswith("left unjudged"))
            rows.append((name, str(dtype).replace("torch.", ""), f"{result.points}", f"{exact}",
                         f"{exact / max(result.points, 1):.3%}", f"{left}", f"{result.rejected_points}",
                         f"{time.perf_counter() - started:.1f}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
