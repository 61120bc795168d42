"""Run every op row of tests/test_ops.py at many examples and print what was checked.

    python benchmarks/op_rows.py --examples 1000 [--ops exp,log]

One line per (op, dtype): examples run, points checked, points rejected (with the most
common reason), seconds, and the verdict. The op-coverage figures in docs/ops.md come from here.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import verify
from tests.test_ops import ROWS, torch_finding

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_row(op: str, dtype_name: str, examples: int) -> str:
    dtype = DTYPES[dtype_name]
    started = time.perf_counter()
    try:
        result = verify.check(ROWS[op], seed=1, dtype=dtype, max_examples=examples)
    except verify.Mismatch as mismatch:
        expected = torch_finding(op, dtype, mismatch.failure.check)
        verdict = "torch finding (expected)" if expected else "FALSE ALARM: " + str(mismatch).splitlines()[0]
        return f"{op:14} {dtype_name:8} {'':>8} {'':>8} {'':>8} {time.perf_counter() - started:7.1f}  {verdict}"
    except verify.Unchecked as unchecked:
        return f"{op:14} {dtype_name:8} {'':>8} {'':>8} {'':>8} {time.perf_counter() - started:7.1f}  UNCHECKED: {unchecked}"
    reason = max(result.rejected, key=result.rejected.get) if result.rejected else ""
    return (f"{op:14} {dtype_name:8} {result.examples:8} {result.points:8} {result.rejected_points:8} "
            f"{time.perf_counter() - started:7.1f}  ok  {reason[:60]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--ops", help="comma-separated op names (default: every row)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args()
    ops = args.ops.split(",") if args.ops else sorted(ROWS)
    print(f"{'op':14} {'dtype':8} {'examples':>8} {'points':>8} {'rejected':>8} {'seconds':>7}  verdict")
    for op in ops:
        for dtype_name in args.dtypes.split(","):
            print(run_row(op, dtype_name, args.examples), flush=True)


if __name__ == "__main__":
    main()
