"""The allowance: the model's bound times a calibrated margin, tight at well-conditioned points."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import verify
from verify.tolerance import ALLOWANCE, UNIT_ROUNDOFF, allowed_error, overflows, precision, underflow_error

from .conftest import planted

magnitudes = st.floats(0, 1e300)


@given(magnitudes, magnitudes, st.sampled_from(list(UNIT_ROUNDOFF)))
def test_allowed_error_is_the_margin_times_u_times_the_bound_and_grows_with_it(bound, extra, dtype):
    base = allowed_error(np.array(bound), dtype)
    assert allowed_error(np.array(bound + extra), dtype) >= base
    assert base == ALLOWANCE[dtype] * UNIT_ROUNDOFF[dtype] * bound


def test_lower_precision_dtypes_are_allowed_more_for_the_same_bound():
    allowed = [float(allowed_error(np.array(1.0), dtype))
               for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    assert allowed == sorted(allowed)


def test_half_types_compute_in_float32_and_store_each_result_and_a_compute_dtype_stores_only_the_results():
    torch_way = precision(torch.bfloat16)
    assert torch_way.compute == torch.float32 and torch_way.stores_kernels and not torch_way.fused
    assert torch_way.kernel_ratio == 2.0**-16 and torch_way.outer_ratio == 1.0
    kernel = precision(torch.bfloat16, torch.float32)
    assert kernel.fused and not kernel.stores_kernels and kernel.outer_ratio == kernel.kernel_ratio
    assert precision(torch.float32).kernel_ratio == 1.0 and not precision(torch.float32).stores_kernels


def test_an_underflowing_step_costs_a_few_of_the_dtypes_smallest_numbers_not_its_smallest_normal_one():
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        smallest = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
        assert smallest < underflow_error(dtype) < torch.finfo(dtype).tiny


@pytest.mark.parametrize("dtype, relative_error", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_a_small_relative_error_in_a_forward_is_caught(plant_torch_form, dtype, relative_error):
    plant_torch_form("sin", lambda x: torch.sin(x) * (1 + relative_error))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(sin(x))", seed=12, dtype=dtype)
    # The scaled forward also scales its autograd derivative; at x = 0 only that shows.
    assert caught.value.failure.check in ("value", "gradient")


@pytest.mark.parametrize("dtype, relative_error", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_a_small_relative_error_in_a_backward_is_caught(plant_torch_form, dtype, relative_error):
    plant_torch_form("sin", planted(torch.sin, lambda x, grad: grad * torch.cos(x) * (1 + relative_error)))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(sin(x))", seed=13, dtype=dtype)
    assert caught.value.failure.check == "gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_result_overflows_exactly_where_rounding_to_the_dtype_gives_infinity(dtype):
    # float16's largest is 65504, and 65521.5 rounds to inf: -4 * 62.125 / 0.0616**2 is no
    # number float16 holds, so torch's inf there is no failure.
    largest = float(torch.finfo(dtype).max)
    spacing = largest - float(torch.nextafter(torch.tensor(largest, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    magnitudes = np.array([largest, largest + spacing * 0.49, largest + spacing * 0.5, largest + spacing * 0.51])
    rounded = torch.tensor(magnitudes, dtype=torch.float64).to(dtype)
    assert list(overflows(magnitudes, 0.0, dtype)) == list(torch.isinf(rounded).numpy())
    assert list(overflows(magnitudes, 0.0, dtype)) == [False, False, True, True]


def test_digammas_absolute_error_near_its_zero_scales_with_the_cotangent():
    # torch's lgamma backward is grad * digamma(x), and digamma is off by up to 1e-6 absolutely
    # near its zero at 1.4616: 1000 times that under a cotangent of 1000, which correct code
    # may be off by (it failed while the error was the whole backward's, 1e-6).
    verify.check_function(lambda x: (1000 * torch.lgamma(x)).sum(), "x: Interval(1.40, 1.52)[n]\no = sum(1000 * lgamma(x))",
                          dtype=torch.float32, seed=0, max_examples=30, modes=("rev",))
