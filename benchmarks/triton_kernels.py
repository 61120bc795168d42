"""Checking Triton kernels: a default ``check_function`` of the project's Triton SiLU and
RMSNorm (``examples/triton_rmsnorm.py``), beside gradcheck on the same kernels.

    python benchmarks/triton_kernels.py

Without a GPU the kernels run through Triton's interpreter on the CPU (the example sets
TRITON_INTERPRET=1), one interpreted program per row or block; with one, on the GPU
(``device="cuda"``). For each kernel and storage dtype it prints the time of a default check
(100 examples, stacked rows, compute dtype float32, reverse mode), the points checked, and
what gradcheck says of the same kernel in float64 at one (8, 16) input, with its time:
gradcheck needs float64, and these kernels compute in float32 whatever they load.
"""

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import verify
from examples import triton_rmsnorm as kernels  # it sets TRITON_INTERPRET where there is no GPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# name -> (kernel, spec, its inputs' shapes for gradcheck)
KERNELS = {
    "SiLU (elementwise)": (kernels.silu, kernels.SILU_SPEC, [(8, 16)]),
    "RMSNorm (row-wise)": (kernels.rmsnorm, kernels.SPEC, [(8, 16), (16,)]),
}


def gradcheck(kernel, shapes) -> str:
    inputs = [torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True) for shape in shapes]
    started = time.perf_counter()
    try:
        passed = torch.autograd.gradcheck(kernel, inputs, raise_exception=False)
    except Exception as exc:  # noqa: BLE001 - reported as gradcheck's outcome
        passed = f"raised {type(exc).__name__}"
    outcome = {True: "passes", False: "fails"}.get(passed, passed)
    return f"{outcome} ({time.perf_counter() - started:.2f} s)"


def main() -> None:
    where = "GPU" if DEVICE == "cuda" else "Triton's interpreter on the CPU"
    print(f"device: {where}; torch {torch.__version__}")
    print(f"{'kernel':<22} {'dtype':<9} {'verdict':>9} {'points':>8}  gradcheck (float64)")
    for name, (kernel, spec, shapes) in KERNELS.items():
        checked_by_gradcheck = gradcheck(kernel, shapes)
        for dtype in (torch.float32, torch.bfloat16):
            started = time.perf_counter()
            result = verify.check_function(kernel, spec, rows=True, dtype=dtype, compute_dtype=torch.float32,
                                           modes=("rev",), device=DEVICE, seed=0)
            seconds = time.perf_counter() - started
            print(f"{name:<22} {str(dtype)[6:]:<9} {seconds:>8.1f}s {result.points:>8}  {checked_by_gradcheck}")


if __name__ == "__main__":
    main()
