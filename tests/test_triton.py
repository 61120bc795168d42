"""The project's Triton example, checked as its users would check their kernels: on the CPU
through Triton's interpreter (TRITON_INTERPRET=1, which the example sets where CUDA is not
available), and on a GPU where one is."""

import importlib.util

import pytest
import torch

import verify

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: pip install -e '.[triton]'", allow_module_level=True)
# Before Triton itself is imported: the example sets TRITON_INTERPRET=1 where there is no GPU.
from examples import triton_rmsnorm as kernels

KERNEL_DTYPES = [torch.float32, torch.bfloat16]
ON_DEVICE = [pytest.param("cpu", id="interpreter"),
             pytest.param("cuda", id="gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no GPU on this machine"))]


def _check(fn, spec, dtype, device, **options):
    return verify.check_function(fn, spec, rows=True, dtype=dtype, compute_dtype=torch.float32, modes=("rev",),
                                 device=device, seed=0, **options)


@pytest.mark.parametrize("device", ON_DEVICE)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_the_triton_rmsnorm_kernels_pass_in_float32_and_bfloat16(dtype, device):
    result = _check(kernels.rmsnorm, kernels.SPEC, dtype, device, max_examples=10)
    assert result.points > 0 and result.calls["values and VJPs"].startswith("the points stacked")


@pytest.mark.parametrize("device", ON_DEVICE)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_a_planted_bug_in_the_triton_backward_is_caught(dtype, device):
    with pytest.raises(verify.Mismatch) as caught:
        _check(kernels.rmsnorm_with_bug, kernels.SPEC, dtype, device, max_examples=10)
    assert caught.value.failure.check == "gradient" and caught.value.failure.subject == "∂y/∂x"


@pytest.mark.parametrize("device", ON_DEVICE)
def test_the_triton_silu_kernels_pass_in_bfloat16(device):
    assert _check(kernels.silu, kernels.SILU_SPEC, torch.bfloat16, device, max_examples=10).points > 0


def test_a_shared_weight_is_read_by_a_row_stride_of_zero():
    # The kernel takes a weight per row (as verify stacks points) or one for all rows (as a
    # model calls it); the two agree, and the shared weight's gradient sums the rows'.
    x = torch.randn(3, 5)
    w = torch.randn(5, requires_grad=True)
    rows = w.detach().expand(3, 5).clone().requires_grad_()
    kernels.rmsnorm(x, w).sum().backward()
    kernels.rmsnorm(x, rows).sum().backward()
    torch.testing.assert_close(w.grad, rows.grad.sum(0))


def test_the_triton_rmsnorm_is_checked_against_its_plain_torch_reference_traced_and_its_bug_caught():
    # No spec typed: the reference's float32 upcast gives the compute dtype.
    from examples import references

    x, w = torch.randn(8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    options = {"reference": references.rmsnorm, "example_inputs": (x, w), "rows": True, "dtype": torch.bfloat16,
               "modes": ("rev",), "seed": 0, "max_examples": 10,
               "domains": {"x": (-10000, 10000), "w": (-10000, 10000)}}
    assert verify.check_function(kernels.rmsnorm, **options).points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(kernels.rmsnorm_with_bug, **options)
    assert caught.value.failure.check == "gradient" and "the spec traced from the reference" in str(caught.value)


def test_a_backward_reading_dy_as_if_contiguous_is_caught_under_a_drawn_layout_and_passes_contiguous():
    options = {"rows": True, "dtype": torch.float32, "compute_dtype": torch.float32, "modes": ("rev",), "seed": 0}
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(kernels.rmsnorm_assuming_row_major_dy, kernels.SPEC, **options)
    assert any(note.startswith("layout:") for note in caught.value.failure.notes)
    assert verify.check_function(kernels.rmsnorm_assuming_row_major_dy, kernels.SPEC, layouts="contiguous",
                                 max_examples=10, **options).points > 0
