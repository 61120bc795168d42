"""Tracing a torch reference into a spec, and checking against it, beside gradcheck.

    python benchmarks/tracing.py [--examples 100]

For each reference of ``examples/references.py`` it prints, each row in a fresh process
forked after the imports:

* first trace: ``verify.spec_from`` the first time in a process (torch's tracer loads its
  own modules then), seconds;
* trace: the same call again, seconds;
* check: ``verify.check`` of the traced spec (float64, ``--examples`` examples), seconds;
* typed: the same check of the hand-written spec in ``examples/``, where one exists;
* gradcheck: ``torch.autograd.gradcheck`` of the reference at the example inputs (in float64),
  seconds, and whether it passed.
"""

import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import verify
from examples import references

BOUNDED = {"x": (-10000, 10000), "w": (-10000, 10000), "b": (-10000, 10000)}
# name -> (example inputs, sizes, domains, the hand-written spec or None)
REFERENCES = {
    "rmsnorm": (lambda: (torch.randn(4, 8), torch.randn(8)), {"x": ("b", "n")}, {}, None),
    "swiglu": (lambda: (torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)), {}, {}, None),
    "rotary": (lambda: (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)), {}, {}, None),
    "smoothed_cross_entropy": (lambda: (torch.randn(3, 5), torch.tensor([1, 2, 4])), {}, {}, None),
    "cross_entropy": (lambda: (torch.randn(3, 5), torch.tensor([1, 2, 4])), {"z": ("b", "c")}, {},
                      "cross_entropy.vspec"),
    "gelu_tanh": (lambda: (torch.randn(5),), {}, {}, None),
    "layer_norm": (lambda: (torch.randn(3, 8), torch.randn(8), torch.randn(8)), {"x": ("m", "n")}, BOUNDED,
                   "layer_norm.vspec"),
}


def _row(name: str, examples: int) -> dict:
    torch.set_num_threads(1)
    make_inputs, sizes, domains, typed = REFERENCES[name]
    fn = getattr(references, name)
    timings = {}
    for key in ("first trace", "trace"):
        started = time.perf_counter()
        spec = verify.spec_from(fn, *make_inputs(), sizes=sizes, domains=domains)
        timings[key] = time.perf_counter() - started
    started = time.perf_counter()
    verify.check(spec, seed=0, max_examples=examples)
    timings["check"] = time.perf_counter() - started
    if typed is not None:
        started = time.perf_counter()
        verify.check(verify.load(ROOT / "examples" / typed), seed=0, max_examples=examples)
        timings["typed"] = time.perf_counter() - started
    inputs = [x.double().requires_grad_() if x.is_floating_point() else x for x in make_inputs()]
    started = time.perf_counter()
    # rmsnorm computes in float32 whatever it is given: gradcheck's float64 differences fail it.
    timings["gradcheck passed"] = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
    timings["gradcheck"] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="examples per check (default 100)")
    arguments = parser.parse_args()
    print(f"torch {torch.__version__}, 1 torch thread, each row in a fresh process after the imports\n")
    print(f"{'reference':24s} {'first trace':>12s} {'trace':>7s} {'check':>7s} {'typed':>7s} {'gradcheck':>10s}")
    context = multiprocessing.get_context("fork")
    for name in REFERENCES:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            row = pool.submit(_row, name, arguments.examples).result()
        typed = f"{row['typed']:6.2f}s" if "typed" in row else ""
        print(f"{name:24s} {row['first trace']:11.2f}s {row['trace']:6.2f}s {row['check']:6.2f}s {typed:>7s} "
              f"{row['gradcheck']:9.3f}s" + ("" if row["gradcheck passed"] else " (failed)"), flush=True)


if __name__ == "__main__":
    main()
