"""A bug planted where each of the allowance's newer rules acts, shown still caught: the
softmax kernels' shift by the row max, a sum of products whose terms underflow, a float64
zero computed with an error, the half types' stored sums and roundings, digamma's absolute
term near its zero, sigmoid's flush below the normal range."""

import pytest
import torch

import verify
from verify import engine
from verify.ops import REGISTRY

from .conftest import planted


@pytest.fixture(autouse=True)
def _verdict_only(monkeypatch):
    # What is measured is the verdict, not how small the counterexample.
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)
    monkeypatch.setattr(engine, "SIMPLIFY_SECONDS", 0.0)


def _caught(fn, spec, dtype, **options) -> verify.Mismatch:
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, dtype=dtype, seed=0, **options)
    return caught.value


def _softmax_backward(y, g):
    return y * (g - (g * y).sum(-1, keepdim=True))


@pytest.mark.parametrize("check", ["value", "gradient"])
def test_a_softmax_off_at_large_logits_is_caught_where_its_kernel_subtracts_the_row_max(check):
    # torch forms exp(x - max): at the max the shift is exact, so the allowance there is a few
    # roundings, not |max| of them (at x = 1000 that was 6000 float32 roundings, 3.6e-4).
    spec = "x: Interval(100, 1000)[n]\ny = softmax(x)"
    off = 1 + 1e-5  # 168 float32 roundings
    if check == "value":
        def fn(x):
            return torch.softmax(x, -1) * off
    else:
        fn = planted(lambda x: torch.softmax(x, -1), lambda x, g: _softmax_backward(torch.softmax(x, -1), g) * off)
    mismatch = _caught(fn, spec, torch.float32, modes=("rev",), max_examples=20)
    assert mismatch.failure.check == check
    assert mismatch.failure.inputs["x"].max() >= 100


def _off_where_a_term_underflows(A, g, gradient):
    """``gradient`` (∂y/∂B of A @ B) 5% off at the elements with a term A[n, k] g[n, m] that is
    nonzero and below float16's normal range, exact elsewhere."""
    terms = (A.double()[..., :, :, None] * g.double()[..., :, None, :]).abs()
    underflowing = ((terms > 0) & (terms < torch.finfo(torch.float16).tiny)).any(dim=-3)
    return torch.where(underflowing, gradient * 1.05, gradient)


def test_a_wrong_einsum_gradient_is_caught_where_its_terms_underflow_float16():
    # The sum of products keeps einsum where a term may underflow, each term allowed
    # underflow's cost (float16's smallest subnormal, 6e-8): a 5% error there is still caught.
    spec = 'A: Interval(-0.0001, 0.0001)[n, k]\nB: Real[k, m]\ny = einsum("nk,km->nm", A, B)'
    fn = planted(lambda A, B: torch.einsum("nk,km->nm", A, B),
                 lambda A, B, g: (torch.einsum("nm,km->nk", g, B),
                                  _off_where_a_term_underflows(A, g, torch.einsum("nk,nm->km", A, g))))
    mismatch = _caught(fn, spec, torch.float16, modes=("rev",), max_examples=30)
    assert mismatch.failure.subject == "∂y/∂B"


def test_a_bug_where_a_step_is_a_float64_zero_with_an_error_is_caught(plant_torch_form):
    # x - mean(x) of a constant row is 0 in float64, with an error bound: such a point is judged
    # by float64's bounds (no longer sent to the exact pass as a possible underflow), and a bug
    # there alone is caught.
    plant_torch_form("exp", lambda t: torch.where(t == 0, 1 + 1e-10, torch.exp(t)))
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Interval(1, 2)[n]\nd = x - mean(x)\ny = exp(d)", seed=0, max_examples=100)
    assert caught.value.failure.check == "value"
    x = caught.value.failure.inputs["x"]
    assert (x - x.mean() == 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_log_softmax_value_off_by_four_roundings_is_caught_beside_its_stored_sum(dtype):
    # The half types round log_softmax's sum before its log: one stored rounding, and a
    # rounding of the dtype absolutely (ops.ROUNDED_SUM_STORED). Four roundings more are caught.
    off = 4 * torch.finfo(dtype).eps / 2
    mismatch = _caught(lambda x: torch.log_softmax(x, -1) - off, "x: Interval(-8, 8)[n]\ny = log_softmax(x)", dtype,
                       modes=("rev",), max_examples=30)
    assert mismatch.failure.check == "value"


def test_a_digamma_off_near_its_zero_is_caught_within_its_absolute_allowance():
    # lgamma's derivative, digamma, is allowed 1e-6 absolutely in float32 near its zero at
    # 1.4616 (reference.DIGAMMA_ABSOLUTE); an error of 1e-5 there is caught.
    fn = planted(torch.lgamma, lambda x, g: g * (torch.digamma(x) + 1e-5))
    mismatch = _caught(fn, "x: Interval(1.40, 1.52)[n]\ny = lgamma(x)", torch.float32, modes=("rev",),
                       max_examples=30)
    assert mismatch.failure.check == "gradient"


def test_a_sigmoid_that_does_not_flush_is_caught_below_the_normal_range():
    # float32 sigmoid flushes to 0 below -87.3 (FLUSHING_FUNCTIONS: allowed float32's smallest
    # normal there); a result 7 times the true one, above that, is caught.
    def fn(x):
        return torch.where(x < -87, torch.exp(x + 2), torch.sigmoid(x))

    mismatch = _caught(fn, "x: Interval(-88, -86.5)[n]\ny = sigmoid(x)", torch.float32, modes=("rev",),
                       max_examples=30)
    assert mismatch.failure.check == "value" and mismatch.failure.inputs["x"].min() < -87


@pytest.mark.parametrize("spec, torch_form, backward", [
    ("x: Real[n]\ny = sigmoid(x)", torch.sigmoid, lambda x, g: g * torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    ("a: Real[n]\nb: Real[n]\ny = hypot(a, b)", torch.hypot,
     lambda a, b, g: (g * a / torch.hypot(a, b), g * b / torch.hypot(a, b))),
], ids=["sigmoid", "hypot"])
def test_a_float16_backward_off_by_eight_roundings_is_caught_beside_one_more_store(spec, torch_form, backward):
    # float16's sigmoid and hypot backwards round once more than their formulas show
    # (ops.ONE_MORE_STORE); a backward 8 roundings off (1 + 8u) is still caught.
    def scaled(*args):
        found = backward(*args)
        return tuple(d * (1 + 8 * 2.0**-11) for d in found) if isinstance(found, tuple) else found * (1 + 8 * 2.0**-11)

    mismatch = _caught(planted(torch_form, scaled), spec, torch.float16, modes=("rev",), max_examples=50)
    assert mismatch.failure.check == "gradient"


def test_at_a_tie_of_topk_the_gradient_of_its_other_factor_is_still_judged():
    # [5, 5, 0]: the order of the tied fives is not known, so ∂o/∂x is not judged there (rule
    # 5); ∂o/∂w does not go through the tie, and a wrong one is caught at that very point.
    doubled = planted(lambda w: w.clone(), lambda w, g: 2 * g)
    spec = "x: Real[n] = [5.0, 5.0, 0.0]\nw: Real[2] = [1.0, 2.0]\no = sum(topk(x, 2) * w)"
    mismatch = _caught(lambda x, w: (torch.topk(x, 2).values * doubled(w)).sum(-1), spec, torch.float64,
                       modes=("rev",), max_examples=1)
    assert mismatch.failure.subject == "∂o/∂w"


def test_a_prod_gradient_off_by_five_percent_is_caught_where_a_partial_product_is_subnormal():
    # 1e-160 * 1e-160 is below float64's normal range: its spacing, scaled by the later factor
    # 1e300, is allowed; a 5% error is not.
    fn = planted(lambda x: torch.prod(x, -1), lambda x, g: g.unsqueeze(-1) * torch.prod(x, -1, keepdim=True) / x * 1.05)
    spec = "x: Positive[n] = [1e-160, 1e-160, 1e300]\no = prod(x)"
    assert _caught(fn, spec, torch.float64, modes=("rev",), max_examples=1).failure.check == "gradient"


def test_a_float16_matmul_forward_mode_off_by_eight_roundings_is_caught():
    # float16's matmul JVP is a kernel computing in float32 and stored once; 1 + 8u is caught.
    def skewed(A, B):
        product = A @ B
        return product + 8 * 2.0**-11 * (product - product.detach())

    spec = "A: Interval(-4, 4)[m, k]\nB: Interval(-4, 4)[k, n]\nC = A @ B"
    assert _caught(skewed, spec, torch.float16, modes=("fwd",), max_examples=30).failure.check == "JVP"


def test_a_second_derivative_off_where_the_gradient_is_right_is_caught_beside_second_orders_widening():
    # A Hessian-vector product is allowed SECOND_ORDER (4) times its formula's bound; a
    # backward whose own derivative is off by 1e-4 (the gradient itself exact) is caught.
    def backward(x, g):
        y = torch.tanh(x)
        return g * (1 - y * y) + 1e-4 * (g * y - (g * y).detach())

    mismatch = _caught(planted(torch.tanh, backward), "x: Interval(0.5, 2)[n]\ny = tanh(x)", torch.float32, order=2,
                       max_examples=20, modes=("rev",))
    assert mismatch.failure.check == "HVP"


def test_a_float32_gelu_backward_off_by_64_roundings_is_caught_beside_its_vectorized_erfs_allowance():
    # float32 gelu's kernel is allowed 12 roundings beyond its formula (ops: its vectorized erf).
    def backward(x, g):
        cdf = 0.5 * (1 + torch.erf(x / 2**0.5))
        return g * (cdf + x * torch.exp(-x * x / 2) / (2 * torch.pi) ** 0.5) * (1 + 64 * 2.0**-24)

    spec = "x: Interval(-4, 4)[n]\ny = gelu(x)"
    assert _caught(planted(torch.nn.functional.gelu, backward), spec, torch.float32, modes=("rev",),
                   max_examples=30).failure.check == "gradient"


def test_a_float64_gelu_backward_off_by_8_roundings_is_caught_where_float32s_erf_allowance_does_not_apply():
    # The 12 roundings are float32's vectorized erf (KernelError.dtypes); float64's gelu kernels
    # are within the formula's model, so 8 roundings more are caught there.
    def backward(x, g):
        return torch.ops.aten.gelu_backward(g, x) * (1 + 8 * 2.0**-53)

    spec = "x: Interval(-4, 4)[n]\ny = gelu(x)"
    assert _caught(planted(torch.nn.functional.gelu, backward), spec, torch.float64, modes=("rev",),
                   max_examples=30).failure.check == "gradient"


def test_a_gradient_computed_from_a_value_near_the_float32_overflow_is_judged_while_that_value_holds():
    # expm1's backward reads its result (g * (y + 1)): the gradient check is dropped where y
    # overflows float32 (past x = 88.72); below, a gradient 1% off is caught.
    def backward(x, g):
        return g * (torch.expm1(x) + 1) * 1.01

    mismatch = _caught(planted(torch.expm1, backward), "x: Interval(85, 89)[n]\ny = expm1(x)", torch.float32,
                       modes=("rev",), max_examples=30)
    assert mismatch.failure.check == "gradient" and mismatch.failure.inputs["x"].max() >= 85


HUGE_SCORES = "Q: Interval(1e75, 1e80)[t, d]\nK: Interval(1e75, 1e80)[t, d]\nO = softmax(Q @ K.T, axis=1)"


def test_a_bound_past_float64s_range_with_no_step_past_it_is_judged_weak_and_torch_not_finite_there_fails():
    # Scores near 1e160 carry float64 errors near 1e144: the model's bound of their softmax
    # overflows float64 (no finite allowance), though no step leaves the range. The point is
    # judged, every element weak, not rejected as a step leaving the range ...
    result = verify.check(HUGE_SCORES, seed=0, max_examples=10, modes=("rev",))
    assert result.points > 0 and not any("leaves" in reason for reason in result.rejected)
    assert result.weak["the value of O"][0] > 0

    # ... and a softmax that is NaN there, where the exact one is finite, still fails.
    def nan_past_1e100(Q, K):
        scores = Q @ K.transpose(-1, -2)
        return torch.where(scores.abs() > 1e100, torch.nan, torch.softmax(scores, -1))

    assert _caught(nan_past_1e100, HUGE_SCORES, torch.float64, modes=("rev",), max_examples=10).failure.check == "value"


def test_an_exp_gradient_twenty_times_too_large_is_caught_below_float32s_normal_range():
    # Below float32's normal range a result may be flushed to 0 (the allowance is at least the
    # smallest normal number there); a gradient 20 times the exact one, above that, is caught.
    fn = planted(torch.exp, lambda x, g: g * torch.exp(x + 3))
    mismatch = _caught(fn, "x: Interval(-88.7, -87.5)[n]\ny = exp(x)", torch.float32, modes=("rev",), max_examples=30)
    assert mismatch.failure.check == "gradient"


def test_a_naive_cross_entropy_that_is_not_finite_where_softmax_underflows_is_caught_not_rejected_by_its_domain():
    # softmax is never 0 exactly, so log(softmax(z)) is inside log's domain wherever float64
    # rounds softmax to 0: the domain verdict stands on the exact value, and torch's inf there
    # (0 * -inf is NaN) is a failure.
    spec = "z: Interval(-1000, 1000)[b, c]\nY: Interval(0, 1)[b, c]\no = -sum(Y * log(softmax(z, axis=1)))"

    def naive(z, Y):
        return -(Y * torch.log(torch.softmax(z, 1))).sum()

    mismatch = _caught(naive, spec, torch.float32, modes=("rev",), max_examples=30)
    assert "not finite" in str(mismatch)


def test_a_max_pool_gradient_scaled_by_8_roundings_is_caught_where_its_sum_holds_one_term_per_window():
    # A max pool's backward routes each window's cotangent to one element, exactly: its sum of
    # deltas adds exact zeros, and a delta multiplies exactly, so 8 roundings are caught.
    def backward(x, g):
        _, where = torch.nn.functional.max_pool1d(x, 2, return_indices=True)
        routed = torch.zeros_like(x).scatter_add(-1, where, g)
        return routed * (1 + 8 * 2.0**-53)

    mismatch = _caught(planted(lambda x: torch.nn.functional.max_pool1d(x, 2), backward),
                       "x: Real[c, l]\ny = max_pool1d(x, kernel=2)", torch.float64, modes=("rev",), max_examples=30)
    assert mismatch.failure.check == "gradient"


def test_dots_lowering_accumulates_as_torch_dot_where_a_product_alone_overflows_float16_and_a_wrong_dot_is_caught():
    # 98 * 930 overflows float16, the dot -56170 does not: the registry's lowering is one
    # accumulation, as torch.dot's kernel (it formed each product in float16, inf there).
    x = torch.tensor([[65.0, -98.0]], dtype=torch.float16)
    z = torch.tensor([[538.0, 930.0]], dtype=torch.float16)
    assert REGISTRY["dot"].torch_form([x, z], {}).item() == torch.dot(x[0], z[0]).item() == -56160
    spec = "x: Interval(-100, 100)[n] = [65, -98]\nz: Interval(-1000, 1000)[n] = [538, 930]\ny = dot(x, z)"
    mismatch = _caught(lambda x, z: torch.dot(x, z) * (1 + 2**-6), spec, torch.float16, modes=("rev",),
                       max_examples=30)
    assert mismatch.failure.check == "value"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_pooling_backward_that_accumulates_in_the_half_type_passes_and_one_off_by_5_percent_is_caught(dtype):
    # torch's CPU pooling and conv backwards accumulate their partial sums in the half types
    # (Op.unfused_in): at a cancellation a correct one is far from a one-store bound. A
    # gradient 5% off is still caught.
    spec = "x: Real[c, l]\ny = avg_pool1d(x, kernel=3, stride=1)"

    def pool(x):
        return torch.nn.functional.avg_pool1d(x, 3, 1)

    verify.check_function(pool, spec, dtype=dtype, seed=0, modes=("rev",), max_examples=30)

    def backward(x, g):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (gradient,) = torch.autograd.grad(pool(leaf), leaf, g)
        return gradient * 1.05

    assert _caught(planted(pool, backward), spec, dtype, modes=("rev",), max_examples=30).failure.check == "gradient"


def test_a_consumers_contribution_to_a_gradient_that_overflows_is_a_step_of_torchs_backward_leaving_the_range():
    # o = dot(x, y) * dot(x, x): torch's autograd stores dot(x, x) * y[0] = 65650 (inf in
    # float16) before adding -1438 to it, though the sum 64212 fits. The spec's own lowering
    # computes that step, so the gradient is not judged there (counted), and not failed.
    spec = "x: Interval(-10, 10)[n] = [1, -8.296875]\ny: Interval(-1000, 1000)[n] = [940, 200]\n" \
           "o = dot(x, y) * dot(x, x)"
    result = verify.check(spec, dtype=torch.float16, seed=0, max_examples=1, modes=("rev",))
    assert result.rejected.get("∂o/∂x: a step of torch's backward overflows float16")


def test_a_dot_backward_off_by_a_percent_is_caught_beside_points_whose_contributions_overflow(plant_torch_form):
    def dot(a, b):
        return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]

    def backward(a, b, g):
        return g.unsqueeze(-1) * b * 1.01, g.unsqueeze(-1) * a * 1.01

    plant_torch_form("dot", lambda tensors, params: planted(dot, backward)(*tensors))
    spec = "x: Interval(-10, 10)[n] = [1, -8.296875]\ny: Interval(-1000, 1000)[n] = [940, 200]\n" \
           "o = dot(x, y) * dot(x, x)"
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(spec, dtype=torch.float16, seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.check == "gradient"


def test_a_value_the_allowance_lets_round_past_float16s_largest_is_not_judged_but_the_gradients_are():
    # c * log_softmax(x) is 65502.55 exactly: log_softmax's -8877 stored as -8880 makes it
    # 65527, which rounds to inf. The exact pass takes the overflow margin from the modelled
    # rounding, as the float64 pass does: that value is not judged (it failed as "not finite"),
    # counted, and the point's gradients are (a backward 1.5 times too large is caught there).
    spec = ("x: Real[n] = [-7676, 1201, -689, -3794, -4240]\nc: Real[n] = [-7.37890625, 1, 1, 1, 1]\n"
            "y = log_softmax(x) * c")

    def forward(x, c):
        return torch.log_softmax(x, -1) * c

    result = verify.check_function(forward, spec, dtype=torch.float16, seed=1, modes=("rev",), max_examples=1)
    assert result.rejected == {"the value of y overflows float16": 1}

    def backward(x, c, g):
        return torch.zeros_like(x), g * torch.log_softmax(x, -1) * 1.5

    mismatch = _caught(planted(forward, backward), spec, torch.float16, modes=("rev",), max_examples=1)
    assert mismatch.failure.check == "gradient" and mismatch.failure.inputs["x"][0] == -7676


def test_a_max_pool_backward_that_gives_every_tied_maximum_the_gradient_is_caught_at_the_tie():
    # A tie in a window is a kink: either maximum may take the gradient, and a selection by a
    # Kronecker delta rounds nothing. Giving it to both doubles the sum of the gradient.
    spec = "x: Real[c, l] = [[1.5, 1.5, 0.25, -2.0]]\ny = max_pool1d(x, kernel=2)"

    def pool(x):
        return torch.nn.functional.max_pool1d(x, 2)

    def backward(x, g):
        windows = x.unflatten(-1, (-1, 2))
        return ((windows == windows.amax(-1, keepdim=True)) * g.unsqueeze(-1)).flatten(-2)

    mismatch = _caught(planted(pool, backward), spec, torch.float32, modes=("rev",), max_examples=1)
    row = mismatch.failure.inputs["x"][0]
    assert mismatch.failure.check == "gradient" and row[0] == row[1]  # found at a tie


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_conv_backward_that_accumulates_in_the_half_type_passes_and_one_off_by_5_percent_is_caught(dtype):
    # conv1d's backward, like pooling's, accumulates in the half types (Op.unfused_in): torch's
    # own passes at cancellations; a weight gradient 5% off is still caught.
    spec = "x: Interval(-4, 4)[b, c, l]\nw: Interval(-4, 4)[f, c, k]\no = conv1d(x, w)"
    conv = torch.nn.functional.conv1d
    verify.check_function(conv, spec, dtype=dtype, seed=0, modes=("rev",), max_examples=30)

    def backward(x, w, g):
        with torch.enable_grad():
            leaves = x.detach().requires_grad_(), w.detach().requires_grad_()
            dx, dw = torch.autograd.grad(conv(*leaves), leaves, g)
        return dx, dw * 1.05

    assert _caught(planted(conv, backward), spec, dtype, modes=("rev",), max_examples=30).failure.check == "gradient"


def test_an_lgamma_gradient_offset_near_digammas_zero_is_caught_under_a_large_cotangent():
    # digamma's absolute allowance sits on the function, so a cotangent of 1000 scales it (torch's
    # own lgamma passes there, tests/test_tolerance.py); an offset of 1e-2 in digamma is not excused.
    spec = "x: Interval(1.40, 1.52)[n]\no = sum(1000 * lgamma(x))"
    off = planted(torch.lgamma, lambda x, g: g * (torch.digamma(x) + 1e-2))
    mismatch = _caught(lambda x: (1000 * off(x)).sum(), spec, torch.float32, modes=("rev",), max_examples=30)
    assert mismatch.failure.check == "gradient"
