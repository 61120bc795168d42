"""Each allowance and rejection rule, with a bug planted in its regime that is still caught,
and correct code in the same regime that passes."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import verify
from verify import acceptance, checks, engine, oracle, strategies
from verify import plan as planning
from verify.ops import REGISTRY
from verify.strategies import Example
from verify.tolerance import allowed_error, precision

from .conftest import planted

DTYPES = [torch.float64, torch.float32]
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _caught(fn, spec, dtype, **options) -> verify.Mismatch:
    # Contiguous: these tests plant bugs in values and regimes, found by the draws they were written for.
    options = {"modes": ("rev",), "seed": 0, "max_examples": 100, "layouts": "contiguous", **options}
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, dtype=dtype, **options)
    return caught.value


# -- saturation: the room for an op's backward is local to the terms through that op -------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_saturated_tanh_backward_that_returns_one_is_caught(dtype):
    tanh_one = planted(torch.tanh, lambda x, g: g * torch.where(x.abs() > 20, 1.0, 1 - torch.tanh(x) ** 2))
    failure = _caught(tanh_one, "x: Interval(20, 60)[n]\ny = tanh(x)", dtype).failure
    assert failure.check == "gradient" and failure.inputs["x"].max() > 20


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturation_elsewhere_in_the_spec_does_not_excuse_another_gradient(dtype):
    # At x = 25 tanh saturates; the gradient of w (3w for 2w) is a separate term.
    def forward(x, w):
        return torch.tanh(x).sum() + (w**2).sum()

    wrong_w = planted(forward, lambda x, w, g: (g * (1 - torch.tanh(x) ** 2), g * 3 * w))
    spec = "x: Interval(25, 26)[n]\nw: Real[n]\no = sum(tanh(x)) + sum(w**2)"
    failure = _caught(wrong_w, spec, dtype).failure
    assert failure.subject == "∂o/∂w"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_saturated_sigmoid_backward_that_returns_one_is_caught(dtype):
    sigmoid_one = planted(torch.sigmoid, lambda x, g: g * torch.where(
        x > 38, 1.0, torch.sigmoid(x) * (1 - torch.sigmoid(x))))
    assert _caught(sigmoid_one, "x: Interval(38, 200)[n]\ny = sigmoid(x)", dtype).failure.check == "gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_expm1_backward_that_returns_one_far_below_zero_is_caught(dtype):
    expm1_one = planted(torch.expm1, lambda x, g: g * torch.where(x < -38, 1.0, torch.exp(x)))
    assert _caught(expm1_one, "x: Interval(-200, -38)[n]\ny = expm1(x)", dtype).failure.check == "gradient"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op, fn", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("expm1", torch.expm1),
                                    ("logsigmoid", F.logsigmoid), ("softplus", F.softplus)])
def test_torch_saturating_ops_pass_in_every_dtype(op, fn, dtype):
    result = verify.check_function(fn, f"x: Real[n]\ny = {op}(x)", dtype=dtype, seed=0, max_examples=10)
    assert result.points > 0


# -- overflow: a float64 step that overflows is decided exactly, never excused --------------

def _softmax_recomputed(x, g):
    s = torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)  # NaN once exp overflows
    return s * (g - (g * s).sum(-1, keepdim=True))


def _logsumexp_recomputed(x, g):
    return g * torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)


@pytest.mark.examples(100)  # exp overflowing in the backward is reached at large x only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("forward, backward, spec", [
    (lambda x: torch.softmax(x, -1), _softmax_recomputed, "y = softmax(x)"),
    (lambda x: torch.logsumexp(x, -1), _logsumexp_recomputed, "y = logsumexp(x)"),
    (lambda x: torch.logsumexp(x, -1), _logsumexp_recomputed, "y = log(sum(exp(x)))"),
], ids=["softmax", "logsumexp", "naive logsumexp"])
def test_a_backward_that_overflows_where_the_math_does_not_is_caught(forward, backward, spec, dtype):
    # Above -80, so that exp's subnormals (where such a backward also loses digits) stay out.
    spec = "x: Interval(-80, 1e30)[n]\n" + spec
    mismatch = _caught(planted(forward, backward), spec, dtype)
    assert mismatch.failure.check == "gradient"
    assert not np.isfinite(mismatch.failure.actual).all()  # nan, or inf from g * exp(x)


@pytest.mark.examples(100)
def test_a_softplus_backward_that_overflows_is_caught_against_the_naive_spec():
    naive = planted(F.softplus, lambda x, g: g * torch.exp(x) / (1 + torch.exp(x)))
    mismatch = _caught(naive, "x: Real[n]\ny = log(1 + exp(x))", torch.float32)
    assert mismatch.failure.check == "gradient" and mismatch.failure.inputs["x"].max() >= 88


@pytest.mark.examples(30)  # the regime where float64 overflows is reached at large x only
@pytest.mark.one_dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn, spec", [
    (lambda x: torch.softmax(x, -1), "x: Real[n]\ny = exp(x) / sum(exp(x))"),
    (lambda x: torch.logsumexp(x, -1), "x: Real[n]\ny = log(sum(exp(x)))"),
    (F.logsigmoid, "x: Real[n]\ny = -log(1 + exp(-x))"),
], ids=["softmax", "logsumexp", "logsigmoid"])
def test_torch_stable_kernels_pass_against_naive_specs_where_float64_overflows(fn, spec, dtype):
    result = verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=30)
    assert result.exact["judged by the exact pass"] > 0  # the regime was reached, and judged


@pytest.mark.examples(30)
def test_the_spec_lowering_of_a_stable_op_is_judged_exactly_not_rejected():
    # Reverse mode: torch's logcumsumexp JVP is a recorded finding.
    result = verify.check("x: Real[n]\ny = logcumsumexp(x)", dtype=torch.float32, seed=0, max_examples=30,
                          modes=("rev",))
    assert result.exact["judged by the exact pass"] > 0
    assert not any(reason.startswith("a step of") for reason in result.rejected)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_kernels_are_modelled_shifted_by_the_row_max_so_float64_judges_where_exp_overflows(op):
    spec = f"x: Interval(700, 1e4)[n]\ny = {op}(x)"
    result = verify.check(spec, seed=0, max_examples=10)
    assert result.points > 0 and not result.rejected and not result.exact
    # A wrong value in that regime is still caught: the row max's own shift, wrongly left in.
    off = {"softmax": lambda x: torch.softmax(x, -1) * (1 + 2**-40),
           "log_softmax": lambda x: torch.log_softmax(x, -1) + x.amax(-1, keepdim=True) * 2**-40,
           "logsumexp": lambda x: torch.logsumexp(x, -1) * (1 + 2**-40)}[op]
    with pytest.raises(verify.Mismatch, match="value"):
        verify.check_function(off, spec, seed=0, max_examples=10)


def test_a_step_of_the_spec_that_overflows_still_rejects_in_check_but_not_in_check_function():
    spec = "x: Interval(100, 200)[n]\ny = log(1 + exp(x))"
    with pytest.raises(verify.Unchecked, match="exp"):  # torch's exp(x) is inf in float32 there: right
        verify.check(spec, dtype=torch.float32, seed=0, max_examples=10)
    result = verify.check_function(F.softplus, spec, dtype=torch.float32, seed=0, max_examples=10)
    assert result.points > 0 and not result.rejected


# -- cancellation: the reference is exact however the spec is phrased ------------------------

@pytest.mark.parametrize("spec", ["x: Interval(25, 40)[n]\ny = logsigmoid(x)",
                                  "x: Interval(25, 40)[n]\ny = -log(1 + exp(-x))",
                                  "x: Interval(25, 40)[n]\ny = -log1p(exp(-x))"])
def test_a_backward_that_cancels_in_one_minus_sigmoid_is_caught(spec):
    # A focal loss's backward computes |label - sigmoid(x)|: 1 - sigmoid(30) keeps 3 digits.
    cancelling = planted(F.logsigmoid, lambda x, g: g * (1 - torch.sigmoid(x)))
    assert _caught(cancelling, spec, torch.float64).failure.check == "gradient"


# -- half precision: one small element drops no point ----------------------------------------

def test_a_cube_backward_that_drops_small_values_is_caught_in_float16():
    flushed = planted(lambda x: x**3, lambda x, g: g * torch.where(x.abs() < 0.095, 0.0, 3 * x**2))
    spec = "x: Interval(-0.5, 0.5)[n]\ny = x**3"
    assert _caught(flushed, spec, torch.float16).failure.check == "gradient"


# -- ties and kinks: decided exactly where reached exactly -----------------------------------

def test_a_tie_between_inputs_is_decided_and_a_wrong_comparison_caught():
    at_least = planted(lambda x, y: torch.where(x >= y, x, 2 * y), lambda x, y, g: (None, None))
    spec = "x: Real[n] = [3.0]\ny: Real[n] = [3.0]\no = where(x > y, x, 2 * y)"
    failure = _caught(at_least, spec, torch.float64, modes=("fwd",)).failure
    assert failure.check == "value"


def _topk_negated_on_tied_rows(k):
    """topk along the last axis whose backward negates rows with two equal elements."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            values, indices = torch.topk(x, k)
            ctx.save_for_backward(x, indices)
            return values

        @staticmethod
        def backward(ctx, grad):
            x, indices = ctx.saved_tensors
            scattered = torch.zeros_like(x).scatter(-1, indices, grad)
            rows = x.sort(-1).values
            tied = (rows[..., 1:] == rows[..., :-1]).any(-1, keepdim=True)
            return torch.where(tied, -scattered, scattered)

    return Planted.apply


def test_ties_that_topk_leaves_out_are_judged_and_a_backward_wrong_there_is_caught():
    # [5, 0, 0]: topk(x, 1) is differentiable there, whatever the order of the zeros.
    spec = "x: Real[n] = [5.0, 0.0, 0.0]\ny = topk(x, 1)"
    assert _caught(_topk_negated_on_tied_rows(1), spec, torch.bfloat16).failure.check == "gradient"


def test_a_tie_at_topks_boundary_or_among_its_selection_leaves_only_the_derivatives_through_it_unjudged():
    # [5, 0, 0] for k = 2: which zero is selected is a matter of order (rule 5); [5, 5, 0]: in
    # which order the fives come. torch.topk orders ties as it likes, as the planted one does.
    for at, reason in (("[5.0, 0.0, 0.0]", "k-th and (k+1)-th largest are tied"),
                       ("[5.0, 5.0, 0.0]", "may take any order")):
        spec = f"x: Real[n] = {at}\nw: Real[2] = [1.0, 2.0]\no = sum(topk(x, 2) * w)"
        result = verify.check_function(lambda x, w: (_topk_negated_on_tied_rows(2)(x) * w).sum(-1), spec, seed=0,
                                       max_examples=1, modes=("rev",))
        assert result.points > 0  # its value, and the gradient of w, are judged
        assert [count for text, count in result.rejected.items() if "∂o/∂x" in text and reason in text] == [1]


def test_the_spec_lowerings_stable_sort_is_judged_at_ties(plant_torch_form):
    spec = "x: Real[n] = [1.0, 1.0, 2.0]\nw: Real[n] = [1.0, 2.0, 3.0]\no = sum(sort(x) * w)"
    result = verify.check(spec, seed=0, max_examples=1)
    assert result.points > 0 and not any("tied" in reason for reason in result.rejected)
    # A sort that orders ties the other way is a valid derivative too, but not the one the
    # spec's lowering states: torch.sort(stable=True) keeps positions.
    plant_torch_form("sort", lambda tensors, params: torch.sort(tensors[0].flip(-1), dim=-1, stable=True).values)
    with pytest.raises(verify.Mismatch):
        verify.check(spec, seed=0, max_examples=1, modes=("rev",))


def test_hardswish_kinks_reached_by_x_plus_3_are_checked_not_rejected():
    spec = "x: Real[n] = [-3.0, 3.0]\ny = x * minimum(maximum(x + 3, 0), 6) / 6"
    result = verify.check_function(F.hardswish, spec, seed=0, max_examples=20, modes=("rev",))
    assert result.points > 0
    assert not any("comparison" in reason for reason in result.rejected)


def _relu_with_derivative_at_zero(slope):
    return planted(lambda x: x.clamp(min=0), lambda x, g: g * torch.where(
        x > 0, 1.0, torch.where(x < 0, 0.0, slope)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_tutorial_relu_with_derivative_one_at_zero_passes(dtype):
    spec = "x: Real[n] = [0.0, -1.0, 2.0]\ny = relu(x)"
    result = verify.check_function(_relu_with_derivative_at_zero(1.0), spec, dtype=dtype, modes=("rev",), seed=0,
                                   max_examples=20)
    assert result.points > 0


def test_a_derivative_at_a_kink_that_no_side_has_is_caught():
    spec = "x: Real[n] = [0.0]\ny = relu(x)"
    mismatch = _caught(_relu_with_derivative_at_zero(2.0), spec, torch.float64)
    assert "no one-sided derivative agrees" in str(mismatch)


def test_torch_kinks_demand_torch_convention():
    spec = "x: Real[n] = [0.0]\ny = relu(x)"
    assert _caught(_relu_with_derivative_at_zero(1.0), spec, torch.float64, kinks="torch").failure.inputs["x"] == 0


# -- a kernel's own error: pow's backward rounds y - 1 ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_pow_with_two_drawn_inputs_passes(dtype):
    result = verify.check_function(torch.pow, "x: Positive[n]\nw: Real[n]\ny = x ** w", dtype=dtype, seed=0,
                                   max_examples=30)
    assert result.points > 0


def test_a_pow_backward_off_by_more_than_the_rounding_of_y_minus_1_is_caught():
    sloppy = planted(torch.pow, lambda x, w, g: (g * w * x ** (w - 1) * (1 + 1e-10), g * x**w * torch.log(x)))
    spec = "x: Interval(2, 10)[n]\nw: Interval(1, 3)[n]\ny = x ** w"
    assert _caught(sloppy, spec, torch.float64).failure.subject == "∂y/∂x"


# -- forward-only Functions ---------------------------------------------------------------

class _ForwardExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return y * tangent


def test_a_function_with_only_a_jvp_is_checked_in_forward_mode():
    result = verify.check_function(_ForwardExp.apply, "x: Real[n]\ny = exp(x)", modes=("fwd",), seed=0,
                                   max_examples=20)
    assert result.checks == "values, JVPs" and result.points > 0


def test_a_function_without_backward_is_unsupported_in_reverse_mode_by_that_name():
    with pytest.raises(verify.Unsupported, match=r"rev mode is not supported: .*backward.*modes=\(\"fwd\",\)"):
        verify.check_function(_ForwardExp.apply, "x: Real[n]\ny = exp(x)", seed=0, max_examples=10)
    assert verify.check_function(_ForwardExp.apply, "x: Real[n]\ny = exp(x)", seed=0, max_examples=10,
                                 modes=("fwd",)).points > 0


# -- the rejection rules themselves: a bug just inside each regime is still caught --------------

def test_a_bug_just_inside_a_domain_is_caught():
    # log's domain is x > 0: the points at 0 are rejected, the tiny positive ones are judged.
    tiny_wrong = planted(torch.log, lambda x, g: g * torch.where(x < 1e-300, 0.0, 1 / x))
    spec = "x: NonNegative[n] = [1e-305, 2.0]\ny = log(x)"
    assert _caught(tiny_wrong, spec, torch.float64).failure.inputs["x"].min() < 1e-300


def test_a_bug_just_below_where_a_step_overflows_is_caught(plant_torch_form):
    # exp(x) overflows float32 above 88.7, and those points are rejected in verify.check; a
    # wrong exp between 80 and 88 is not excused by them.
    plant_torch_form("exp", lambda t: torch.where((t > 80) & (t < 88), torch.exp(t) * 1.001, torch.exp(t)))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Interval(80, 100)[n]\ny = exp(x)", dtype=torch.float32, seed=0, max_examples=30)
    assert 80 < caught.value.failure.inputs["x"].max()


def test_a_wrong_stable_op_in_the_spec_lowering_is_caught_where_its_sympy_form_overflows(plant_torch_form):
    # softmax's sympy form overflows float64 above 709; torch's kernel does not, so those points
    # are judged exactly in verify.check, not rejected: a planted error there is caught.
    plant_torch_form("softmax", lambda t, d: torch.where(t > 709, 0.5, torch.softmax(t, d)))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Interval(700, 800)[n]\ny = softmax(x)", seed=0, max_examples=30)
    assert caught.value.failure.inputs["x"].max() > 709


def test_a_bug_just_outside_a_comparisons_rounding_band_is_caught():
    # Within a rounding of x = 1/3, where(x > 1/3, ...) may go either way, and the point is
    # rejected; 1e-4 away it is judged, and a bug there is caught.
    spec = "x: Real[n] = [0.3333333333333333]\ny = where(x > 1/3, x, 2 * x)"
    assert verify.check_function(lambda x: torch.where(x > 1 / 3, x, 2 * x), spec, seed=0, max_examples=20).points
    near_wrong = planted(lambda x: torch.where(x > 1 / 3, x, 2 * x) + torch.where((x - 1 / 3).abs() < 1e-3, 1e-3, 0.0),
                           lambda x, g: (g * torch.where(x > 1 / 3, 1.0, 2.0),))
    failure = _caught(near_wrong, spec.replace("0.3333333333333333", "0.3334"), torch.float64).failure
    assert abs(failure.inputs["x"] - 1 / 3).min() < 1e-3


def test_a_bug_just_below_where_the_checked_quantity_overflows_is_caught():
    # x**3 overflows float32 above about 7e12 (and is judged only below 6.9e11, the edge
    # margin): a wrong cube between 1e11 and 5e11 is caught.
    spec = "x: Interval(1e11, 1e13)[n]\ny = x**3"
    assert any("overflows float32" in r for r in verify.check_function(
        lambda x: x**3, spec, dtype=torch.float32, seed=0, max_examples=20).rejected)
    wrong = planted(lambda x: torch.where(x < 5e11, x**3 * 1.001, x**3), lambda x, g: g * 3 * x**2)
    assert _caught(wrong, spec, torch.float32).failure.inputs["x"].min() < 5e11


# -- the exact pass's model: second-order terms, singularities, and its reach ---------------------

def test_a_second_order_rounding_term_is_allowed_and_a_bug_of_its_size_caught():
    # sinc(x)**2 is exactly 0 at an integer x; float32 rounds pi * x, and squares what is left:
    # 1.8e-16 at x = 22520560, a second-order term of u that the first-order model has as 0.
    spec = "x: Real[n] = [22520560.0]\ny = sinc(x)**2"
    verify.check_function(lambda x: torch.sinc(x)**2, spec, dtype=torch.float32, seed=0, max_examples=10)

    def wrong(x):
        return torch.sinc(x)**2 + torch.where(x.abs() > 1e6, 1e-12, 0.0)

    assert _caught(wrong, spec, torch.float32).failure.inputs["x"].max() > 1e6


def _acosh_of_one_plus(e):
    """acosh(1 + e) without forming 1 + e: log1p(e + sqrt(e * (2 + e)))."""
    return torch.log1p(e + torch.sqrt(e * (2 + e)))


def test_a_check_whose_spec_steps_reach_a_singularity_is_rejected_alone_where_the_code_is_finite():
    # 1 + exp(-x) rounds to 1 in float64 above x = 36.7, where acosh' is infinite: the spec as
    # written has no finite allowance there. Code that never forms 1 + exp(-x) is finite and
    # right: those checks are rejected, counted, not failed; below, the points are judged.
    spec = "x: Interval(30, 45)[n]\ny = acosh(1 + exp(-x))"
    result = verify.check_function(lambda x: _acosh_of_one_plus(torch.exp(-x)), spec, seed=0, max_examples=30)
    assert result.points > 0
    assert any("reaches a singularity" in reason for reason in result.rejected)
    assert not any("outside the domain" in reason for reason in result.rejected)


def test_a_point_whose_checks_reach_a_singularity_is_one_reason_naming_them_and_the_rest_are_judged():
    # Above x = 36.7 the value, the gradient and the JVP of the spec as written have no finite
    # allowance: one reason per point names the three. Below, a value 1% off is caught.
    spec = "x: Interval(30, 45)[n]\ny = acosh(1 + exp(-x))"
    right = verify.check_function(lambda x: _acosh_of_one_plus(torch.exp(-x)), spec, seed=0, max_examples=10)
    singular = [reason for reason in right.rejected if "reaches a singularity" in reason]
    assert singular == ["the value of y, ∂y/∂x, the JVP of y: one rounding of the spec's steps reaches a "
                        "singularity (no finite allowance)"]
    off = _caught(lambda x: _acosh_of_one_plus(torch.exp(-x)) * 1.01, spec, torch.float64, max_examples=10)
    assert off.failure.check == "value"


def test_code_that_is_not_finite_where_the_math_is_fails_before_any_rule_could_reject_its_point():
    # The same spec computed as written: torch's autograd gives -inf above x = 36.7, where the
    # exact derivative is finite. No rule rejects that point first (the singularity of rule 4
    # is the code's own): it fails, and the report says why.
    spec = "x: Interval(30, 45)[n]\ny = acosh(1 + exp(-x))"
    failure = _caught(lambda x: torch.acosh(1 + torch.exp(-x)), spec, torch.float64, max_examples=30).failure
    assert failure.check == "gradient" and not np.isfinite(failure.actual).all()
    assert any("not finite where the exact value is finite" in note for note in failure.notes)


@pytest.mark.shrinks  # the failure asserted is the shrunk one, at the underflowing element
def test_a_step_that_underflows_to_zero_rejects_the_spec_lowering_and_code_that_divides_by_it_fails():
    # x**2 underflows float64 to 0 at x = 1e-177, and sqrt's derivative there is infinite. In
    # the spec's own lowering that step is not a number float64 holds: the point is rejected.
    # A user's function computed the same way gives inf where the derivative is 1: it fails.
    spec = "x: Interval(-1e150, 1e150)[n] = [1e-177, 2.0]\ny = sqrt(x**2)"
    result = verify.check(spec, seed=0, max_examples=20)
    assert any("underflows to 0 in float64" in reason for reason in result.rejected)
    failure = _caught(lambda x: torch.sqrt(x**2), spec, torch.float64, max_examples=20).failure
    assert failure.check == "gradient" and np.isinf(failure.actual[0])
    wrong = planted(torch.abs, lambda x, g: g * torch.where(x.abs() > 1, 2 * x.sign(), x.sign()))
    assert _caught(wrong, spec, torch.float64).failure.check == "gradient"


def test_a_disagreement_beyond_arbs_range_is_decided_by_float64s_sure_bounds():
    # exp(-x**2) at x = 3e18 needs exp of -9e36, past arb's exponent range; float64 is sure the
    # value is 0 there, so a function returning 1 fails (it used to be left unjudged).
    spec = "x: Real[n] = [3e18]\ny = exp(-x**2)"
    wrong = planted(lambda x: torch.where(x.abs() > 1e18, 1.0, torch.exp(-x**2)),
                      lambda x, g: g * -2 * x * torch.exp(-x**2))
    failure = _caught(wrong, spec, torch.float64).failure
    assert any("float64's bounds decide" in note for note in failure.notes)


class _DetPlusSquaresWrongWhereIllConditioned(torch.autograd.Function):
    """det(A) + sum(w**2), whose w-gradient is 1e-11 off where A is ill-conditioned."""

    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return torch.det(a) + (w**2).sum()

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        off = 1e-11 * (torch.linalg.cond(a) > 1e5).to(w.dtype)
        return g * torch.det(a) * torch.linalg.inv(a).mT, g * 2 * w * (1 + off)


def test_a_solves_kernel_model_widens_only_what_depends_on_it():
    # det's norm-wise error grows with A's condition number (4e5 here); it used to widen every
    # gradient at the point, and excused this w-gradient, which det never touches.
    spec = "A: Real[2, 2] = [[1.0, 1.0], [1.0, 1.00001]]\nw: Real[n] = [3.0]\no = det(A) + sum(w**2)"
    failure = _caught(_DetPlusSquaresWrongWhereIllConditioned.apply, spec, torch.float64, max_examples=20).failure
    assert failure.subject == "∂o/∂w"


# -- an explicit extra allowance, for code that knowingly trades accuracy ---------------------

def _tanh_off_by(relative):
    return planted(lambda x: torch.tanh(x) * (1 + relative), lambda x, g: g * (1 - torch.tanh(x)**2))


def test_an_explicit_rtol_admits_code_that_trades_accuracy_and_no_more():
    spec = "x: Real[n]\ny = tanh(x)"
    assert _caught(_tanh_off_by(1e-6), spec, torch.float64).failure.check == "value"
    assert verify.check_function(_tanh_off_by(1e-6), spec, modes=("rev",), seed=0, max_examples=30,
                                 rtol=1e-5).points > 0
    mismatch = _caught(_tanh_off_by(1e-4), spec, torch.float64, rtol=1e-5)
    assert mismatch.failure.check == "value" and "rtol=1e-05" in str(mismatch)


def test_an_extra_allowance_must_be_a_finite_non_negative_number():
    with pytest.raises(ValueError, match="atol must be a finite number"):
        verify.check_function(torch.tanh, "x: Real[n]\ny = tanh(x)", atol=-1.0)


def test_a_wrong_gradient_where_the_spec_is_ill_conditioned_but_bounded_is_caught():
    # Below x = 36.7, acosh(1 + exp(-x))'s steps lose digits (1 + exp(-30) keeps 3 of them in
    # its difference from 1), and the chain-rule model's allowance grows with that; a gradient
    # 10% off there is still far outside it.
    def forward(x):
        return torch.acosh(1 + torch.exp(-x))

    def backward(x, g):
        return g * -torch.exp(-x / 2) / torch.sqrt(2 + torch.exp(-x)) * 1.1

    spec = "x: Interval(30, 35)[n]\ny = acosh(1 + exp(-x))"
    assert _caught(planted(forward, backward), spec, torch.float64).failure.check == "gradient"


# -- rejection by domain, with an element that overflows elsewhere in the point -----------------

def test_a_bug_where_an_element_overflows_and_none_leaves_the_domain_is_caught():
    # A point is rejected when one element is surely outside a domain, judged element by element
    # (an overflowed neighbour no longer hides it); a point with no such element is judged.
    def wrong_when_huge(x):
        return torch.where(x.abs() > 1e150, 2 * x.abs(), x.abs())

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(wrong_when_huge, "x: Real[n] = [2.0, 1e155]\ny = sqrt(x**2)", seed=0,
                              modes=("rev",), max_examples=1)
    assert caught.value.failure.inputs["x"].tolist() == [2.0, 1e155]


# -- the exact pass's budget for large points ---------------------------------------------------

@pytest.mark.examples(50)
def test_a_backward_bug_in_large_points_only_the_exact_pass_can_judge_is_caught(monkeypatch):
    # At n = 300 the exact pass judges 3 points of an example's 13, not 8; the points where torch
    # is not finite go first, so the overflowing backward is still judged, where float64's own
    # naive formula overflows too. (Users' batches, so that the exact pass has points to choose from.)
    monkeypatch.setattr(engine, "PER_POINT", strategies.PER_POINT)
    mismatch = _caught(planted(lambda x: torch.softmax(x, -1), _softmax_recomputed),
                       "x: Interval(-80, 1e30)[n]\ny = exp(x) / sum(exp(x))", torch.float64, sizes={"n": 300})
    assert mismatch.failure.check == "gradient" and not np.isfinite(mismatch.failure.actual).all()


@pytest.mark.parametrize("dtype, at, bug", [(torch.float64, [-555.0, 115.0], 1e-240), (torch.float16, [-12.0, 5.0], 1.0)],
                         ids=["float64", "float16"])
def test_an_adjoint_that_underflows_in_the_specs_own_backward_is_allowed_and_a_bug_there_caught(dtype, at, bug):
    # At x = [-555, 115] with cotangent [1, 0], the spec's backward forms the adjoint of
    # sum(exp(x)), -e^-555 / e^230, below float64's subnormals: torch gets 0 for it, and 0 for
    # ∂y/∂x[1], where the math is -1.05e-291. That underflow times exp(115) is the exact
    # pass's allowance there; a backward off by ``bug`` is far past it. In float16 the same
    # happens at [-12, 5], times exp(5), where the allowance's absolute term (16 tiny) already
    # covers it: there the case shows that correct code passes and a bug is still caught.
    spec = verify.parse("x: Real[n]\ny = exp(x) / sum(exp(x))")
    prepared = planning.plan(spec)
    x = torch.tensor(at, dtype=dtype, requires_grad=True)
    cotangent = torch.tensor([1.0, 0.0], dtype=dtype)
    (torch.exp(x) / torch.exp(x).sum()).backward(cotangent)
    point = Example({"n": 2}, {"x": x.detach().double().numpy()[None]}, cotangent.double().numpy()[None])
    reference, bound = oracle.exact_point(prepared, point, precision(dtype), 1, False).side.gradients["x"]
    allowed = allowed_error(bound, precision(dtype))[0]
    assert x.grad[1] == 0 and abs(x.grad[1].item() - reference[0, 1]) <= allowed[1] < bug


# -- the exact pass's budget -----------------------------------------------------------------

# Each regime where a point's exact values reject it, before any derivative enters balls: the
# rejected point, the reason, an accepted point, and a backward off by a little that is caught
# at the accepted points.
VALUES_REJECT = {
    # exp(exp(x)) overflows float64 past x = 6.56
    "overflow, float64": ("x: Interval(6, 7)[n]\ny = exp(exp(x))", torch.float64, 6.9,
                          "the value of y overflows float64", 6.0, lambda x: torch.exp(torch.exp(x)),
                          lambda x, g: g * torch.exp(torch.exp(x) + x) * (1 + 1e-9)),
    # exp(x) overflows float16 past x = 11.09 (and nears its edge margin well before); at x = 8
    # the allowance is about 7% (16 u times exp's condition, x), so the planted bug is 25% off
    "overflow, float16": ("x: Interval(7, 12)[n]\ny = exp(x)", torch.float16, 11.5,
                          "the value of y overflows float16", 8.0, torch.exp, lambda x, g: g * torch.exp(x) * 1.25),
    # log's operand x**2 - 1 is negative inside (-1, 1)
    "domain, float64": ("x: Interval(-3, 3)[n]\ny = log(x * x - 1)", torch.float64, 0.5,
                        "y is outside the domain of log: x > 0", 2.0, lambda x: torch.log(x * x - 1),
                        lambda x, g: g * 2 * x / (x * x - 1) * (1 + 1e-9)),
}


@pytest.mark.parametrize("regime", VALUES_REJECT)
def test_a_point_its_exact_values_reject_is_rejected_as_the_whole_exact_pass_would_and_a_bug_beside_it_is_caught(
        regime):
    spec, dtype, rejected_at, reason, accepted_at, forward, backward = VALUES_REJECT[regime]
    prepared = planning.plan(verify.parse(spec))
    options = checks.Options(dtype=dtype, modes=("rev",))
    for value, expected in ((rejected_at, Counter({reason: 1})), (accepted_at, Counter())):
        point = Example({"n": 1}, {"x": np.array([[value]])}, np.ones((1, 1)))
        reasons = Counter()
        assert checks._rejected_by_its_values(prepared, prepared.subject, point, options, reasons) == bool(expected)
        full = Counter()
        exact = oracle.exact_point(prepared, point, precision(dtype), 1, False)
        inside, _ = acceptance.inside_domains(prepared, point, exact.side.values, full, how="exact",
                                              gaps=exact.gaps)
        acceptance.accepted_points(1, precision(dtype), full, inside, checks._value_checks(
            prepared, prepared.subject, exact.side.values), how="exact")
        assert reasons == full == expected
    assert _caught(planted(forward, backward), spec, dtype, max_examples=20).failure.check == "gradient"


@pytest.mark.examples(3)
def test_float64s_sure_disagreements_are_never_left_unjudged_and_a_bug_among_them_is_caught(plant_torch_form):
    # One key: its softmax weight is 1, whose derivative is 0, where V is tiny and K large. No
    # disagreement float64's bounds are sure of is left unjudged, whatever the budget: each is
    # decided exactly, or the run is inconclusive.
    spec = ("q: Interval(-1, 1)[d]\nK: Interval(-1000, 1000)[1, d]\nV: Interval(-1e-150, 1e-150)[1, d]\n"
            "O = softmax(K @ q, axis=0) @ V")
    result = verify.check(spec, seed=2, max_examples=3)
    assert result.points > 0 and not result.inconclusive
    assert not any("disagreed" in what and "unjudged" in what for what in result.exact)
    matmul = REGISTRY["matmul"].torch_form
    plant_torch_form("matmul", lambda *operands: matmul(*operands) * (1 + 1e-6))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(spec, seed=2, max_examples=3)
    assert caught.value.failure.check in ("value", "gradient")


def test_a_value_past_the_dtypes_range_is_rejected_by_float64s_own_bound_and_its_gradient_still_judged():
    # x * x overflows float32, so the allowance's bound of y is lost; float64's own bound still
    # shows y beyond float32's range, without the exact pass, and the gradient 2x is judged.
    spec = "x: Interval(1e20, 1e30)[n]\ny = x * x"
    result = verify.check_function(lambda x: x * x, spec, dtype=torch.float32, modes=("rev",), seed=0,
                                   max_examples=20)
    assert result.points > 0 and result.rejected["the value of y overflows float32"] > 0
    assert not result.exact["judged by the exact pass"]
    wrong = planted(lambda x: x * x, lambda x, g: 3 * x * g)
    assert _caught(wrong, spec, torch.float32, max_examples=20).failure.check == "gradient"


def test_a_float16_result_just_below_the_rounding_boundary_is_judged_and_inf_there_fails():
    # 255.9**2 = 65484.81 rounds to 65504 in float16, not to inf (inf starts at 65520): code that
    # returns inf there fails, while a correct square passes.
    spec = "x: Real[n] = [255.9]\ny = x * x"
    assert verify.check_function(lambda x: x * x, spec, dtype=torch.float16, seed=0, max_examples=1,
                                 modes=("rev",)).points > 0
    overflowing = planted(lambda x: torch.where(x.abs() > 255, torch.inf, x * x), lambda x, g: 2 * x * g)
    assert _caught(overflowing, spec, torch.float16, max_examples=1).failure.check == "value"


def test_a_wrong_gradient_through_a_reshaped_weight_is_caught_where_its_index_is_a_branch_not_taken():
    # Reshape's VJP indexes by (i - k) / c, no integer where its branch is not taken: the weight's
    # gradient is still judged, and one that forgets the normalized factor is caught.
    from tests.test_real_code import LAYER_NORM_2D, LayerNorm2d

    class WithoutTheNormalizedFactor(LayerNorm2d):
        @staticmethod
        def backward(ctx, grad_output):
            gx, _, gb, none = LayerNorm2d.backward(ctx, grad_output)
            return gx, grad_output.sum(dim=(0, 2, 3)), gb, none

    spec = LAYER_NORM_2D.format(x="Interval(-1e15, 1e15)")
    failure = _caught(WithoutTheNormalizedFactor.apply, spec, torch.float64, max_examples=20).failure
    assert failure.subject == "∂y/∂g"
