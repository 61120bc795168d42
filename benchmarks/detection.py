"""Which bugs each tool catches: verify.check_function against torch's gradcheck/gradgradcheck.

    python benchmarks/detection.py [--examples 100]

Runs both tools over benchmarks/corpus.py (correct and deliberately broken custom Functions)
in float64 and float32, in one run. gradcheck gets its usual setup: standard-normal inputs
of a fixed shape, its default tolerances, and gradgradcheck for second order. verify gets
the Function and the spec of its math, order=2, reverse mode. Prints one line per case and
a summary: broken Functions caught, correct ones falsely alarmed, per tool and dtype.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import verify
from benchmarks.corpus import CASES

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def run_verify(case, dtype, examples) -> str:
    try:
        verify.check_function(case.fn, case.spec, dtype=dtype, order=2, modes=("rev",), seed=0,
                              max_examples=examples)
    except verify.Mismatch as mismatch:
        return "alarm: " + mismatch.failure.check
    except verify.Unchecked:
        return "unchecked"
    return "pass"


def run_gradcheck(case, dtype) -> str:
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(shape, dtype=dtype, generator=generator, requires_grad=True) for shape in case.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradcheck warns about non-double inputs
        try:
            if not torch.autograd.gradcheck(case.fn, inputs, raise_exception=False):
                return "alarm: gradient"
            if not torch.autograd.gradgradcheck(case.fn, inputs, raise_exception=False):
                return "alarm: second order"
        except Exception as exc:  # noqa: BLE001 - gradcheck raising counts as an alarm
            return f"alarm: {type(exc).__name__}"
    return "pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="Hypothesis examples per verify run")
    args = parser.parse_args()
    tally = {}  # (tool, dtype) -> [caught, broken, false alarms, correct, seconds]
    print(f"{'case':40} {'dtype':8} {'verify':24} {'gradcheck':24}")
    for case in CASES:
        for dtype_name, dtype in DTYPES.items():
            outcomes = {}
            for tool in ("verify", "gradcheck"):
                started = time.perf_counter()
                outcomes[tool] = run_verify(case, dtype, args.examples) if tool == "verify" else run_gradcheck(case, dtype)
                counts = tally.setdefault((tool, dtype_name), [0, 0, 0, 0, 0.0])
                alarmed = outcomes[tool].startswith("alarm")
                if case.bug:
                    counts[0] += alarmed
                    counts[1] += 1
                else:
                    counts[2] += alarmed
                    counts[3] += 1
                counts[4] += time.perf_counter() - started
            label = f"{case.name}" + (f" [{case.bug}]" if case.bug else "")
            print(f"{label[:40]:40} {dtype_name:8} {outcomes['verify']:24} {outcomes['gradcheck']:24}", flush=True)
    print()
    print("| tool | dtype | broken caught | correct falsely alarmed | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for (tool, dtype_name), (caught, broken, false, correct, seconds) in tally.items():
        print(f"| {tool} | {dtype_name} | {caught} / {broken} | {false} / {correct} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
