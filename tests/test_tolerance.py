"""The tolerance rule: tight at well-conditioned points, wider where the reference is sensitive."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import verify
from verify.tolerance import SAFETY, UNIT_ROUNDOFF, allowed_error

magnitudes = st.floats(0, 1e300)


@given(magnitudes, magnitudes, magnitudes, st.sampled_from(list(UNIT_ROUNDOFF)))
def test_allowed_error_grows_with_the_error_bound_and_the_value(reference, bound, extra, dtype):
    base = allowed_error(np.array(reference), np.array(bound), dtype)
    assert allowed_error(np.array(reference), np.array(bound + extra), dtype) >= base
    assert allowed_error(np.array(reference + extra), np.array(bound), dtype) >= base
    assert base >= SAFETY * UNIT_ROUNDOFF[dtype] * reference


@given(st.floats(1e-30, 1e30))
def test_well_conditioned_points_are_held_far_below_a_thousandth_in_float32(reference):
    # A formula evaluated in a few steps has an error bound of a few times |reference|.
    allowed = allowed_error(np.array(reference), np.array(4 * reference), torch.float32)
    assert allowed / reference < 1e-5


def test_lower_precision_dtypes_are_allowed_more():
    allowed = [float(allowed_error(np.array(1.0), np.array(1.0), dtype))
               for dtype in (torch.float64, torch.float32, torch.float16)]
    assert allowed == sorted(allowed)


@pytest.mark.parametrize("dtype, relative_error", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
def test_a_small_relative_error_in_a_forward_is_caught(plant_torch_form, dtype, relative_error):
    plant_torch_form("sin", lambda x: torch.sin(x) * (1 + relative_error))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(sin(x))", seed=12, dtype=dtype)
    # The scaled forward also scales its autograd derivative; at x = 0 only that shows.
    assert caught.value.failure.check in ("value", "gradient")


@pytest.mark.parametrize("dtype, relative_error", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
def test_a_small_relative_error_in_a_backward_is_caught(plant_torch_form, dtype, relative_error):
    class SlightlyWrongSin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return grad_output * torch.cos(x) * (1 + relative_error)

    plant_torch_form("sin", SlightlyWrongSin.apply)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(sin(x))", seed=13, dtype=dtype)
    assert caught.value.failure.check == "gradient"
