"""Time to a verdict: a default check of realistic specs, beside gradcheck on the same function.

    python benchmarks/time_to_verdict.py [--only NAME,...] [--skip-failures]

Each row runs in a fresh process forked after the imports, so that it pays its own sympy
work (nothing cached) but not the import of torch and sympy, which the last lines time
separately. For each row it prints:

* planning: the sympy work (parse, differentiate, prove, compile), seconds;
* verdict: the whole default check (100 examples, float64), planning included, seconds;
* memory: the growth of the process's peak resident memory over the row, MB;
* points: the points checked;
* gradcheck: ``torch.autograd.gradcheck`` on the same function at the sizes given, seconds.

Then the time to the first failure (found, shrunk and reported) for each broken Function of
``benchmarks/corpus.py``, and the time from a shell to the first verdict of ``verify check``.
"""

import argparse
import concurrent.futures
import multiprocessing
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import verify
from benchmarks.corpus import CASES
from verify import plan as planning


def example(name: str) -> str:
    return (ROOT / "examples" / f"{name}.vspec").read_text()


def _softmax(z, axis):
    return torch.softmax(z, dim=axis)


# name -> (spec text, the same function in torch, its inputs' shapes for gradcheck)
SPECS = {
    "the seed": (example("backprop"), lambda x: 0.5 * (x**2).sum(), [(8,)]),
    "MLP layer": ("W: Real[m, n]\nx: Real[n]\nb: Real[m]\no = sum(tanh(W @ x + b)**2)",
                  lambda W, x, b: (torch.tanh(W @ x + b) ** 2).sum(), [(8, 8), (8,), (8,)]),
    "layer norm, written out": (
        "x: Real[n]\nmu = sum(x) / n\nd = x - mu\nv = sum(d**2) / n\ny = d / sqrt(v + 1/100000)",
        lambda x: (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-5), [(8,)]),
    "2-D attention": (
        "Q: Real[t, d]\nK: Real[t, d]\nV: Real[t, d]\nO = softmax(Q @ K.T / sqrt(d), axis=1) @ V",
        lambda Q, K, V: _softmax(Q @ K.T / Q.shape[1] ** 0.5, 1) @ V, [(8, 8)] * 3),
    "five chained softmaxes": (
        "x: Real[n]\na = softmax(x)\nb = softmax(a)\nc = softmax(b)\nd = softmax(c)\ny = softmax(d)",
        lambda x: _softmax(_softmax(_softmax(_softmax(_softmax(x, 0), 0), 0), 0), 0), [(8,)]),
    "cross-entropy": (example("cross_entropy"), None, None),
    "conv1d": (example("conv1d"), lambda x, w: F.conv1d(x, w), [(2, 3, 8), (4, 3, 3)]),
    "attention, batch and heads": (example("attention"),
                                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 4, 8)] * 3),
    "layer norm (example)": (example("layer_norm"),
                             lambda x, w, b: F.layer_norm(x, (x.shape[1],), w, b, eps=1e-5), [(2, 8), (8,), (8,)]),
}
FUNCTIONS = {
    "check_function(torch.tanh)": (torch.tanh, "x: Real[n]\ny = tanh(x)", [(8,)]),
    "check_function(F.gelu)": (F.gelu, "x: Real[n]\ny = x * (1 + erf(x / sqrt(2))) / 2", [(8,)]),
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gradcheck_seconds(fn, shapes) -> float | None:
    if fn is None:
        return None
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    started = time.perf_counter()
    torch.autograd.gradcheck(fn, inputs)
    return time.perf_counter() - started


def _row(name: str) -> dict:
    """One row, in its own process."""
    torch.set_num_threads(1)
    before = _peak_mb()
    started = time.perf_counter()
    if name in SPECS:
        text, fn, shapes = SPECS[name]
        planning.plan(verify.parse(text))
        planned = time.perf_counter() - started
        result = verify.check(text, seed=0)
    else:
        fn, text, shapes = FUNCTIONS[name]
        planning.plan(verify.parse(text))
        planned = time.perf_counter() - started
        result = verify.check_function(fn, text, seed=0)
    verdict = time.perf_counter() - started
    return {"planning": planned, "verdict": verdict, "memory": _peak_mb() - before, "points": result.points,
            "gradcheck": _gradcheck_seconds(fn, shapes), "calls": "; ".join(f"{what}: {how}" for what, how in result.calls.items())}


def _first_failure(index: int) -> tuple:
    torch.set_num_threads(1)
    case = [c for c in CASES if c.bug][index]
    started = time.perf_counter()
    for dtype in (torch.float64, torch.float32):
        try:
            verify.check_function(case.fn, case.spec, dtype=dtype, order=2, modes=("rev",), seed=0)
        except verify.Mismatch as mismatch:
            return case.name, time.perf_counter() - started, f"{mismatch.failure.check} ({str(dtype)[6:]})"
    return case.name, time.perf_counter() - started, "not caught"


def _in_fresh_process(function, *arguments):
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row names")
    parser.add_argument("--skip-failures", action="store_true", help="leave out the broken Functions' rows")
    arguments = parser.parse_args()
    names = [*SPECS, *FUNCTIONS]
    if arguments.only:
        names = [n for n in names if n in arguments.only.split(",")]
    print(f"torch {torch.__version__}, 1 torch thread, each row in a fresh process after the imports\n")
    print(f"{'row':30s} {'planning':>9s} {'verdict':>8s} {'memory':>8s} {'points':>8s} {'gradcheck':>10s}")
    for name in names:
        row = _in_fresh_process(_row, name)
        gradcheck = "" if row["gradcheck"] is None else f"{row['gradcheck']:9.3f}s"
        print(f"{name:30s} {row['planning']:8.2f}s {row['verdict']:7.2f}s {row['memory']:6.0f}MB "
              f"{row['points']:8d} {gradcheck:>10s}" + (f"  ({row['calls']})" if row["calls"] else ""), flush=True)
    if not arguments.skip_failures:
        print(f"\n{'broken Function (benchmarks/corpus.py)':40s} {'first failure':>14s}  check")
        for index in range(sum(1 for c in CASES if c.bug)):
            name, seconds, check = _in_fresh_process(_first_failure, index)
            print(f"{name:40s} {seconds:13.2f}s  {check}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(["verify", "check", str(ROOT / "examples" / "backprop.vspec"), "--seed", "0"],
                               capture_output=True, text=True, check=False)
    first = completed.stdout.splitlines()[0] if completed.stdout else completed.stderr
    print(f"\nfrom a shell, `verify check examples/backprop.vspec` to its verdict: {time.perf_counter() - started:.2f}s"
          f"  ({first[:60]}...)")


if __name__ == "__main__":
    main()
