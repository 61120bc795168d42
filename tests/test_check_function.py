"""verify.check_function on users' own code: the corpus of correct and broken Functions."""

import re
from collections import Counter

import numpy as np
import pytest
import sympy
import torch

import verify
from benchmarks.corpus import CASES, Sin, Tanh
from verify import checks, engine
from verify import plan as planning
from verify.report import Result
from verify.strategies import Example
from verify.subject import STACKED, VMAPPED, FunctionSubject, _first_difference

from .conftest import silu_scaled

CORRECT = [case for case in CASES if not case.bug]
BROKEN = [case for case in CASES if case.bug]
# The check each planted bug is expected to fail (the shrinker may settle on another failing check).
EXPECTED_CHECKS = {
    "wrong formula": {"gradient", "HVP"},  # at x = 0 the gradient is right, its derivative is not
    "sign error": {"gradient"},
    "ignored grad_output": {"gradient", "HVP"},
    "wrong branch above a threshold": {"gradient"},
    "approximate backward": {"gradient", "HVP"},  # its derivative is the approximation's too
    "NaN from overflow": {"gradient"},
    "transposed weight gradient": {"gradient", "HVP"},  # W's gradient is wrong, and so its derivative in x
    "detached backward": {"HVP"},
    "saturation": {"gradient"},
    "NaN from overflow in a stable op": {"gradient"},
    "cancellation": {"gradient"},
    "flushed small values": {"gradient", "HVP"},
    "tie": {"value"},
}


@pytest.mark.one_dtype
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CORRECT, ids=[c.name for c in CORRECT])
def test_correct_function_passes_to_second_order(case, dtype):
    result = verify.check_function(case.fn, case.spec, dtype=dtype, order=2, modes=("rev",), seed=0,
                                   max_examples=30)
    assert result.points > 0
    assert result.checks == "values, VJPs, HVPs"


@pytest.mark.parametrize("case", BROKEN, ids=[c.name for c in BROKEN])
def test_broken_function_is_caught_with_the_check_that_failed(case):
    caught = []
    for dtype in (torch.float64, torch.float32):
        try:
            verify.check_function(case.fn, case.spec, dtype=dtype, order=2, modes=("rev",), seed=0, max_examples=100)
        except verify.Mismatch as mismatch:
            caught.append(mismatch)
            break
    assert caught, f"{case.name} was not caught in float64 or float32"
    failure = caught[0].failure
    assert failure.check in EXPECTED_CHECKS[case.bug]
    report = str(caught[0])
    assert "input:" in report and "reproduce:  verify.check_function(" in report
    assert "or call it directly:" in report and f"{case.fn.__self__.__name__}.apply(" in failure.snippet


def test_nan_from_overflow_is_found_where_the_derivative_is_finite():
    case = next(c for c in BROKEN if c.bug == "NaN from overflow")
    with pytest.raises(verify.Mismatch) as caught:  # over all reals it is caught first just above 20
        verify.check_function(case.fn, "x: Interval(710, 10000)[n]\ny = softplus(x)", modes=("rev",), seed=0)
    failure = caught.value.failure
    assert failure.inputs["x"].max() > 709  # exp overflows float64 there; the derivative is 1
    assert "nan" in str(caught.value)


def test_forward_mode_is_checked_where_the_function_has_a_jvp():
    result = verify.check_function(Tanh.apply, "x: Real[n]\ny = tanh(x)", seed=0, max_examples=30)
    assert result.checks == "values, VJPs, JVPs"


def test_function_without_forward_mode_is_reported_unsupported_before_drawing():
    with pytest.raises(verify.Unsupported, match="jvp") as caught:
        verify.check_function(Sin.apply, "x: Real[n]\ny = sin(x)", seed=0, max_examples=20)
    assert 'pass modes=("rev",) to check reverse mode only' in str(caught.value)
    assert caught.value.result.examples == 0  # said at once, not after every reverse check
    assert verify.check_function(Sin.apply, "x: Real[n]\ny = sin(x)", seed=0, max_examples=5,
                                 modes=("rev",)).points > 0


@pytest.mark.parametrize("op", ["det", "inv"])
def test_an_op_torch_has_no_half_type_kernel_for_is_unsupported_in_that_dtype_not_failed(op):
    # det says "not implemented for 'BFloat16'", inv "Low precision dtypes not supported".
    with pytest.raises(verify.Unsupported, match="dtype"):
        verify.check(f"A: Real[n, n]\no = sum({op}(A))", dtype=torch.bfloat16, seed=0, max_examples=3)


def test_forward_mode_with_a_wrong_jvp_is_caught():
    class TanhWrongJvp(Tanh):
        @staticmethod
        def jvp(ctx, t):
            (y,) = ctx.saved_tensors
            return t * (1 - y)

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(TanhWrongJvp.apply, "x: Real[n]\ny = tanh(x)", seed=0)
    assert caught.value.failure.check == "JVP"
    assert "fwAD.make_dual" in caught.value.failure.snippet


def test_exception_in_the_backward_is_a_finding_at_the_input_that_triggers_it():
    class FailsAboveOne(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            if (x > 1).any():
                raise ValueError("unexpected large input")
            return 2 * x * g

    with pytest.raises(verify.Mismatch, match="ValueError: unexpected large input") as caught:
        verify.check_function(FailsAboveOne.apply, "x: Real[n]\ny = x**2", modes=("rev",), seed=0)
    assert caught.value.failure.inputs["x"].max() > 1
    assert "test_check_function.py" in caught.value.failure.error  # the user's line, not torch's


def test_code_that_raises_only_at_rejected_points_is_no_finding():
    # At x = 0, sqrt(x**2) takes sqrt at 0, outside the domain of sqrt's derivative (torch's
    # backward gives 0 * inf there): the point is rejected, so what the code does there is not
    # checked, even when the rest of its batch is.
    # (Computed as abs: torch.sqrt(x**2) itself is rightly a finding where x**2 overflows or
    # underflows, its gradient inf at x = 1e-177.)
    def raises_at_zero(x):
        if (x == 0).any():
            raise ValueError("zero")
        return torch.abs(x)

    result = verify.check_function(raises_at_zero, "x: Real[n] = [0.0, 4.0]\ny = sqrt(x**2)", seed=0,
                                   max_examples=20)
    assert result.points > 0 and any("domain of sqrt's derivative" in reason for reason in result.rejected)


def test_a_point_outside_a_domain_is_rejected_though_another_element_overflows():
    # x**2 overflows float64 at 1e155, so that element's bounds are infinite; the element at 0
    # is still surely outside sqrt's derivative's domain, and the point rejected for it.
    def raises_at_zero(x):
        if (x == 0).any():
            raise ValueError("zero")
        return torch.abs(x)

    with pytest.raises(verify.Unchecked, match="domain of sqrt's derivative"):
        verify.check_function(raises_at_zero, "x: Real[n] = [0.0, 1e155]\ny = sqrt(x**2)", seed=0, max_examples=1)


def test_a_batch_that_fails_counts_none_of_its_points_as_checked():
    spec = verify.parse("x: Real[n]\ny = sqrt(x)")
    prepared = planning.plan(spec)
    result = Result("<spec>", "float64", 0)
    example = Example({"n": 1}, {"x": np.array([[4.0], [9.0]])}, np.ones((2, 1)), {"x": np.ones((2, 1))})
    wrong_at_nine = FunctionSubject(spec, lambda x: torch.sqrt(x) + (x == 9) * 1e-3)
    failure = checks.evaluate(prepared, wrong_at_nine, example, checks.Options(), result, Counter())
    assert failure is not None and failure.inputs["x"].tolist() == [9.0]
    assert result.points == 0


def test_gradient_of_the_wrong_shape_is_a_finding():
    class SummedGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 3 * x

        @staticmethod
        def backward(ctx, g):
            return (3 * g).sum(0, keepdim=True)

    with pytest.raises(verify.Mismatch, match="shape") as caught:
        verify.check_function(SummedGradient.apply, "x: Real[n]\ny = 3 * x", modes=("rev",), seed=0)
    assert caught.value.failure.inputs["x"].shape[0] >= 2  # n = 1 would hide it


def test_output_of_the_wrong_shape_is_a_finding():
    with pytest.raises(verify.Mismatch, match=r"returned shape \(\)"):
        verify.check_function(lambda x: x.sum(), "x: Real[n]\ny = 2 * x", modes=("rev",), seed=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_dtypes_pass_correct_code(dtype):
    result = verify.check_function(Tanh.apply, "x: Real[n]\ny = tanh(x)", dtype=dtype, order=2, seed=0,
                                   max_examples=50)
    assert result.points > 0


def test_check_takes_the_same_options_for_torchs_own_ops():
    result = verify.check("x: Real[n]\ny = tanh(x) * x\no = sum(y)", order=2, seed=0, max_examples=30)
    assert result.checks == "values, VJPs, JVPs, HVPs"


def test_hessian_claims_are_proved_and_refuted():
    proved = verify.check("x: Real[n]\no = sum(x**3) / 3\nassert hessian(o, x) == diag(2 * x)", seed=0,
                          max_examples=20)
    assert proved.claims[0].status == "proved for all n"
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(x**3) / 3\nassert hessian(o, x) == diag(x)", seed=0, max_examples=20)
    assert caught.value.failure.check == "claim"


def test_a_torch_function_is_called_once_per_batch_through_vmap():
    calls = 0

    def tanh(x):
        nonlocal calls
        calls += 1
        return torch.tanh(x)

    result = verify.check_function(tanh, "x: Real[n]\ny = tanh(x)", seed=0, max_examples=20)
    assert result.calls == {"values and VJPs": VMAPPED, "JVPs": VMAPPED}
    assert "calls for values and VJPs: batched by torch.func.vmap" in str(result)
    # Per example: one vmapped call and two eager ones (the spot check), for VJPs and for JVPs.
    assert calls <= 6 * result.examples < result.points


def test_a_bug_is_caught_through_vmap_and_reproduced_by_a_call_alone():
    def gelu_with_a_wrong_tail(x):
        return torch.where(x > 3, x * 1.001, torch.nn.functional.gelu(x, approximate="none"))

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(gelu_with_a_wrong_tail, "x: Real[n]\ny = x * (1 + erf(x / sqrt(2))) / 2", seed=0,
                              max_examples=30)
    failure = caught.value.failure
    assert failure.inputs["x"].max() > 3 and caught.value.result.calls["values and VJPs"] == VMAPPED
    x = torch.tensor(failure.inputs["x"])
    assert not torch.allclose(gelu_with_a_wrong_tail(x), torch.nn.functional.gelu(x))  # the eager call shows it


def test_a_function_that_vmap_cannot_batch_is_called_point_by_point():
    result = verify.check_function(Tanh.apply, "x: Real[n]\ny = tanh(x)", seed=0, modes=("rev",), max_examples=10)
    assert result.calls["values and VJPs"].startswith("point by point (torch.func.vmap raised RuntimeError")


class _Tanh(torch.autograd.Function):
    """tanh in the style torch.func transforms take (forward without ctx, setup_context)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class TanhWithWrongVmapRule(_Tanh):
    @staticmethod
    def vmap(info, in_dims, x):
        y = TanhWithWrongVmapRule.apply(x)
        return torch.where(x > 1, y * 0.5, y), in_dims[0]


class TanhWrongPastTwoRows(_Tanh):
    @staticmethod
    def vmap(info, in_dims, x):
        y = TanhWrongPastTwoRows.apply(x.movedim(in_dims[0], 0))
        return torch.cat([y[:2], 0.5 * y[2:]]), 0  # right on the spot check's points only


@pytest.mark.parametrize("function, why", [
    (TanhWithWrongVmapRule.apply, "the vmapped results differed from calls one by one"),
    (TanhWrongPastTwoRows.apply, "its vmapped results disagreed with the spec at a point where a call alone agrees"),
])
def test_a_function_whose_vmapped_results_differ_is_checked_point_by_point(function, why):
    # What is checked is the function called alone, the eager way; a batching rule that
    # differs only changes how it is called, and the report says so.
    result = verify.check_function(function, "x: Real[n]\ny = tanh(x)", seed=0, modes=("rev",), max_examples=30)
    assert result.calls == {"values and VJPs": f"point by point ({why})"}


# -- stacked rows and the compute dtype: how kernels are checked ------------------------------

RMS = "x: Interval(-100, 100)[n]\ny = x / sqrt(mean(x**2) + 1e-6)"  # squares within float16's range


def _rms(x):
    """RMS normalization of each row of ``x``: a row-wise function, as kernels are."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)


def _rms_in_float32(x):
    return _rms(x.float()).to(x.dtype)


def test_a_row_wise_function_takes_many_points_in_one_call():
    calls = 0

    def counted(x):
        nonlocal calls
        calls += 1
        return _rms(x)

    result = verify.check_function(counted, RMS, rows=True, seed=0, max_examples=20)
    assert result.calls == {"values and VJPs": STACKED, "JVPs": STACKED}
    # Per example: one stacked call and two stacks of one (the spot check), for VJPs and for JVPs.
    assert calls <= 6 * result.examples < result.points


def test_rows_that_are_not_independent_fail_stacked_saying_the_calls_differed():
    def normalized_by_the_whole_stack(x):
        return x / torch.sqrt((x * x).mean() + 1e-6)

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(normalized_by_the_whole_stack, RMS, rows=True, seed=0, max_examples=20)
    assert caught.value.failure.check == "value"
    assert "than called with it alone" in str(caught.value) and "the rows are not independent" in str(caught.value)


def test_stacked_rows_that_differ_from_single_calls_within_the_allowance_pass():
    # The variance of equal values is 0 exactly. torch's kernel leaves a residue of 1e-13 on
    # one row of -5.09 and none on several: far beyond 64 roundings of 0, and both are right.
    constant_rows = verify.parse("c: Interval(-6, -5)\nz: Real[7]\ny = var(c + 0 * z)")
    result = verify.check_function(lambda c, z: torch.var(c[:, None] + 0 * z, -1), constant_rows, rows=True, seed=0,
                                   max_examples=20, dtype=torch.float32, modes=("rev",), layouts="contiguous")
    assert result.points > 0
    one_row = torch.full((1, 7), -5.094132423400879)
    assert torch.var(one_row, -1) != 0 and torch.var(one_row.expand(3, 7).contiguous(), -1)[0] == 0


@pytest.mark.examples(20)
def test_torchs_prod_stacked_names_its_recorded_finding(monkeypatch):
    # prod's backward divides by each factor (or, beside a zero anywhere in the stack, forms
    # the products of the others): where partial products leave float32's range, it fails.
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)  # the first failure drawn is this one
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda a: torch.prod(a, -1), "A: Real[n, m]\ny = prod(A, axis=1)", rows=True, seed=1,
                              max_examples=20, dtype=torch.float32, modes=("rev",), layouts="contiguous")
    assert "a recorded finding in torch's own prod" in str(caught.value)


def test_stacked_and_single_calls_differ_where_one_overflowed_and_not_where_both_did():
    single = {"y": np.array([[np.inf, 1.0]])}
    assert _first_difference(single, {"y": np.array([[np.nan, 1.0]])}, torch.float32) is None
    assert _first_difference(single, {"y": np.array([[np.inf, -np.inf]])}, torch.float32) == ("y", 0)


class _RMSForgettingTheNorm(torch.autograd.Function):
    """A row-wise RMS normalization whose backward forgets that the norm depends on x."""

    @staticmethod
    def forward(ctx, x):
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        ctx.save_for_backward(rstd)
        return x * rstd

    @staticmethod
    def backward(ctx, g):
        (rstd,) = ctx.saved_tensors
        return g * rstd


def test_a_row_wise_bug_is_caught_and_reproduced_with_a_stack_of_one():
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(_RMSForgettingTheNorm.apply, RMS, rows=True, seed=0, modes=("rev",), max_examples=20)
    failure = caught.value.failure
    assert failure.check == "gradient" and "rows=True" in str(caught.value)
    assert "x = torch.tensor([[" in failure.snippet  # it calls the function with a stack of one point


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_kernel_computing_in_float32_passes_with_its_compute_dtype_and_one_computing_narrow_is_caught(dtype):
    # Declared to compute in float32, a function is allowed float32's roundings and one rounding
    # of each result to the stored dtype: one that computes in the narrow dtype is caught.
    options = {"rows": True, "dtype": dtype, "seed": 0, "modes": ("rev",), "max_examples": 30}
    assert verify.check_function(_rms_in_float32, RMS, compute_dtype=torch.float32, **options).points > 0
    assert verify.check_function(_rms, RMS, **options).points > 0  # narrow steps, where it says nothing
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(_rms, RMS, compute_dtype=torch.float32, **options)
    assert caught.value.failure.check in ("value", "gradient")
    assert "compute_dtype=torch.float32" in caught.value.failure.render("<spec>", caught.value.result.reproduce)


def _rounded_toward_zero(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """Positive float32 ``x`` rounded toward zero to bfloat16, less ``ulps`` more of bfloat16's
    ulps; its gradient passes straight through."""
    bits = x.detach().view(torch.int32) & ~0xFFFF
    rounded = (bits - ulps * 0x10000).view(torch.float32)
    return (x + (rounded - x).detach()).to(torch.bfloat16)  # exact: rounded is x's neighbour in bfloat16


@pytest.mark.parametrize("ulps, caught", [(0, False), (4, True)])
def test_a_result_rounded_toward_zero_to_the_stored_dtype_passes_and_four_ulps_more_are_caught(ulps, caught):
    def stored_toward_zero(x):
        return _rounded_toward_zero(torch.exp(x.float()), ulps)

    spec = "x: Interval(-20, 20)[n]\ny = exp(x)"
    options = {"dtype": torch.bfloat16, "compute_dtype": torch.float32, "rows": True, "seed": 0, "modes": ("rev",),
               "max_examples": 20}
    if not caught:
        assert verify.check_function(stored_toward_zero, spec, **options).points > 0
        return
    with pytest.raises(verify.Mismatch) as mismatch:
        verify.check_function(stored_toward_zero, spec, **options)
    assert mismatch.value.failure.check == "value"


def test_a_compute_dtype_narrower_than_the_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype must be a dtype at least as precise as dtype"):
        verify.check_function(torch.tanh, "x: Real[n]\ny = tanh(x)", dtype=torch.float32,
                              compute_dtype=torch.bfloat16)


@pytest.mark.examples(30)  # x past 88 (exp's float32 overflow) is drawn in some examples only
def test_a_float32_kernel_whose_steps_overflow_is_caught_under_its_compute_dtype_and_a_stable_one_passes():
    # Stored in bfloat16, whose range holds softplus(x) = x at x = 100, but computed in float32,
    # where exp(100) overflows: the naive kernel returns inf there. The compute-dtype rule judges
    # the result, never excuses a step, so it is caught; torch's stable softplus passes.
    def naive(x):
        return torch.log(1 + torch.exp(x.float())).to(x.dtype)

    def stable(x):
        return torch.nn.functional.softplus(x.float()).to(x.dtype)

    spec = "x: Interval(-200, 200)[n]\ny = log(1 + exp(x))"
    options = {"dtype": torch.bfloat16, "compute_dtype": torch.float32, "rows": True, "seed": 0, "modes": ("rev",),
               "max_examples": 30, "layouts": "contiguous"}  # the regime is the dtype's, not a layout's
    assert verify.check_function(stable, spec, **options).points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(naive, spec, **options)
    assert caught.value.failure.inputs["x"].max() > 88


def test_a_failure_at_the_range_edge_names_the_overflowing_step_and_the_interval_that_avoids_it():
    # A correct RMSNorm in float32: at x = 1.8e19, x**2 overflows and the row is 0 where the math
    # is 1. The failure stands; the report says why and what to declare, and that declaration passes.
    spec = "x: Real[n]\ny = x / sqrt(mean(x**2) + 1/1000000)"

    def rms_norm(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)

    with pytest.raises(verify.Mismatch) as caught:  # seed 0's contiguous draws reach 1.8e19
        verify.check_function(rms_norm, spec, dtype=torch.float32, seed=0, modes=("rev",), layouts="contiguous")
    notes = caught.value.failure.notes
    assert any(note.startswith("(x**2) is") and "rounds to inf in float32" in note for note in notes)
    suggestion = next(note for note in notes if note.startswith("if inputs this large cannot occur"))
    assert "`x: Interval(-1.8e+19, 1.8e+19)[n]`" in suggestion
    bounded = spec.replace("Real[n]", "Interval(-1.8e+19, 1.8e+19)[n]")
    assert verify.check_function(rms_norm, bounded, dtype=torch.float32, seed=0, modes=("rev",)).points > 0


def test_a_failure_from_an_underflowed_step_names_it():
    # x * x underflows float32 at 1e-30, and the normalized row is inf where the math is finite.
    spec = "x: Real[n] = [1e-30, 2e-30]\ny = x / sqrt(sum(x**2))"
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: x / torch.sqrt((x * x).sum()), spec, dtype=torch.float32, seed=0,
                              max_examples=1, modes=("rev",))
    notes = caught.value.failure.notes
    assert any(note.startswith("(x**2) is 1e-60 here, below float32's smallest number") for note in notes)
    assert not any(note.startswith("if inputs this large") for note in notes)


FIVE_INPUTS = "a: Real[n]\nb: Real[n]\nc: Real[n]\nd: Real[n]\nf: Real[n]\ny = a + b + c + d + f"


@pytest.mark.parametrize("fn", [lambda x: x, torch.tanh], ids=["lambda", "builtin"])
def test_a_function_that_cannot_take_the_spec_inputs_is_a_type_error_before_drawing(fn):
    with pytest.raises(TypeError, match=r"spec's (5 input\(s\) )?\(?.*a, b, c, d, f\)?.*declar"):
        verify.check_function(fn, FIVE_INPUTS, seed=0, max_examples=5)


def test_a_module_whose_forward_wants_more_inputs_is_a_type_error_before_drawing():
    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2, bias=False)

        def forward(self, x, shift):
            return self.lin(x) + shift

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'shift'"):
        verify.check_function(Shifted(), "x: Real[3]\nlin_weight: Real[2, 3]\ny = lin_weight @ x", seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_a_device_that_is_not_here_is_a_value_error():
    with pytest.raises(ValueError, match="device 'cuda' is not available here"):
        verify.check_function(torch.tanh, "x: Real[n]\ny = tanh(x)", device="cuda")


def test_sequential_parameters_bind_names_that_parse_and_the_error_suggests_them():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    with pytest.raises(verify.SpecError) as caught:
        verify.check_function(model, "x: Real[3]\ny = x", seed=0)
    assert "p0_weight: Real[2, 3]; p0_bias: Real[2]" in str(caught.value)
    spec = "x: Real[3]\np0_weight: Real[2, 3]\np0_bias: Real[2]\ny = tanh(p0_weight @ x + p0_bias)"
    assert verify.check_function(model, spec, seed=0, max_examples=3).points > 0
    by_hand = "x: Real[3]\nW: Real[2, 3]\nb: Real[2]\ny = tanh(W @ x + b)"
    assert verify.check_function(model, by_hand, parameters={"W": "0.weight", "b": "0.bias"}, seed=0,
                                 max_examples=3).points > 0


def test_a_lambdas_snippet_runs_taking_the_function():
    wrong = lambda x: torch.tanh(x) * 1.01  # noqa: E731 - a lambda is the point
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(wrong, "x: Real[n]\ny = tanh(x)", seed=0, max_examples=5)
    snippet = caught.value.failure.snippet
    assert "def reproduce(fn):" in snippet and "<lambda>(" not in snippet
    namespace = {}
    exec(snippet, namespace)  # our own generated code, in a test
    namespace["reproduce"](wrong)


INTERNAL_NAMES = re.compile(r"_k\d|_cotangent|_adjoint|_tangent|\(∂(\w+)/∂\1\)|\(d\w+\)")


@pytest.mark.parametrize("fn, spec, options, shown", [
    (silu_scaled(1.01), "x: Real[n]\ns = sigmoid(x)\ny = x * s", {"modes": ("rev",)},
     "∂y/∂x[i] = (1 - sigmoid(x[i]))*sigmoid(x[i])*g[i]*x[i] + sigmoid(x[i])*g[i]   (g: the cotangent handed"),
    (lambda x: torch.tanh(2 * x) * 1.001, "x: Real[n]\nh = x * 2\ny = tanh(h)", {"modes": ("fwd",)},
     "JVP of y[i] = 2*(1 - tanh(2*x[i])**2)*dx[i]"),
    (lambda x: 0.5 * x * (1 + torch.tanh(0.8 * (x + 0.044715 * x**3))),
     "x: Real[n]\ny = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))", {"modes": ("rev",)},
     "0.044715*x[i]**3"),
    (lambda x, w: torch.nn.functional.conv1d(x, w * 1.01), "x: Real[b, c, l]\nw: Real[f, c, k]\ny = conv1d(x, w)",
     {"modes": ("rev",), "max_examples": 5, "layouts": "contiguous"}, "Sum("),
], ids=["gradient", "JVP", "constant", "sum"])
def test_a_reports_formula_reads_as_math_with_no_internal_names(fn, spec, options, shown, monkeypatch):
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, seed=0, **options)
    formula = caught.value.failure.formula
    assert shown in formula
    assert not INTERNAL_NAMES.search(formula), formula


def test_a_tuples_cotangents_are_named_after_their_outputs():
    from verify.report import readable

    expr = sympy.IndexedBase("_cotangent_of_m")[sympy.Symbol("i")] * sympy.Symbol("_k3")
    assert readable(expr, "y") in ("g_m[i]*j", "j*g_m[i]")


def test_rows_wrong_only_when_stacked_are_caught_where_single_calls_are_right():
    # Row 0 is 1% off when stacked beside others, right alone: the spot check differs, and the
    # stacked results, judged in its place, fail there.
    def first_row_off_when_stacked(x):
        y = torch.tanh(x)
        return torch.cat([y[:1] * 1.01, y[1:]]) if x.shape[0] > 1 else y

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(first_row_off_when_stacked, "x: Interval(0.5, 2)[n]\ny = tanh(x)", rows=True, seed=0,
                              max_examples=20, modes=("rev",), layouts="contiguous")
    assert caught.value.failure.check == "value"
    assert any(note.startswith("rows: called with the points stacked") for note in caught.value.failure.notes)


def test_stacked_nan_where_single_calls_give_inf_is_no_difference_but_both_fail_where_the_math_is_finite():
    def overflowing(x):
        y = torch.tanh(x)
        broken = torch.full_like(y, float("nan") if x.shape[0] > 1 else float("inf"))
        return torch.where(x.abs() > 1, broken, y)

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(overflowing, "x: Interval(-4, 4)[n]\ny = tanh(x)", rows=True, seed=0, max_examples=20,
                              modes=("rev",), layouts="contiguous")
    assert caught.value.failure.check == "value"
    assert any("not finite where the exact value is finite" in note for note in caught.value.failure.notes)
