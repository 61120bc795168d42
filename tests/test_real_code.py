"""Constructs that real gradient code needs (the "real code" issues), each checked against
torch's own code where it has one, in float64 and float32."""

from pathlib import Path

import pytest
import torch

import verify
from tests.test_examples import sparsemax

DTYPES = [torch.float64, torch.float32]
pytestmark = pytest.mark.one_dtype  # the quick profile runs each case in one of them


class GradientReversal(torch.autograd.Function):
    """The domain-adaptation layer: the identity forward, the negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class GradientReversalWithoutTheSign(GradientReversal):
    @staticmethod
    def backward(ctx, g):
        return g


class StraightThroughSquare(torch.autograd.Function):
    """x**2 forward, and the gradient passed straight through (as a quantizer's STE does)."""

    @staticmethod
    def forward(ctx, x):
        return x**2

    @staticmethod
    def backward(ctx, g):
        return g


def _square(x):
    return x**2  # autograd's true gradient, 2x, where the spec passes the gradient straight through


REVERSAL = "x: Real[n]\ny = stop_gradient(2 * x) - x"
STRAIGHT_THROUGH = "x: Real[n]\ny = x + stop_gradient(x**2 - x)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stop_gradient_expresses_gradient_reversal_and_a_straight_through_estimator(dtype):
    assert verify.check_function(GradientReversal.apply, REVERSAL, dtype=dtype, seed=0, max_examples=30,
                                 order=2, modes=("rev",)).points > 0
    assert verify.check_function(StraightThroughSquare.apply, STRAIGHT_THROUGH, dtype=dtype, seed=0,
                                 max_examples=30, modes=("rev",)).points > 0


@pytest.mark.parametrize("fn, spec", [(GradientReversalWithoutTheSign.apply, REVERSAL), (_square, STRAIGHT_THROUGH)],
                         ids=["reversal without the sign", "true gradient where the spec passes it straight"])
def test_a_gradient_that_stop_gradient_rules_out_is_caught(fn, spec):
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.check == "gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stop_gradients_own_lowering_passes_and_its_claims_are_proved(dtype):
    spec = STRAIGHT_THROUGH + "\no = sum(y * x)\nassert grad(o, x) == y + x"
    result = verify.check(spec, dtype=dtype, seed=0, max_examples=30, order=2)
    assert result.points > 0 and result.claims[0].proved
    with pytest.raises(verify.Mismatch):
        verify.check(STRAIGHT_THROUGH + "\no = sum(y * x)\nassert grad(o, x) == 3 * x**2", seed=0, max_examples=30)


# -- data inputs: drawn in their domain, never differentiated --------------------------------

# Within (-12, 12), where 1 - sigmoid(z), as the spec's own lowering computes it, stays above 0 in float32.
# As torch computes it: (1 - t) * z - log(sigmoid(z)), whose terms cancel where t is near 0 and
# z far below 0 (off by u * |z|, 0.4% of a 1e-4 loss at z = -9 in float32), and whose double
# backward is sigmoid's, s * (1 - s), which cancels where z is far above 0. The naive
# -t * log(sigmoid(z)) - (1 - t) * log(1 - sigmoid(z)) has neither cancellation.
SOFT_TARGETS = ("z: Interval(-12, 12)[n]\nt: Data(Interval(0, 1))[n]\n"
                "o = sum((1 - t) * z - log(sigmoid(z)))")


def _loss_with_detached_targets(z, t):
    return torch.nn.functional.binary_cross_entropy_with_logits(z, t.detach(), reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_data_input_is_drawn_but_gets_no_gradient(dtype):
    result = verify.check_function(_loss_with_detached_targets, SOFT_TARGETS, dtype=dtype, seed=0, max_examples=30,
                                   order=2)
    assert result.points > 0
    assert verify.check(SOFT_TARGETS, dtype=dtype, seed=0, max_examples=30).points > 0
    # Declared as a plain input, t is differentiated, and the detached target is (rightly) wrong.
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(_loss_with_detached_targets, SOFT_TARGETS.replace("Data(Interval(0, 1))", "Interval(0, 1)"),
                              dtype=dtype, seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.subject == "∂o/∂t"


def test_a_wrong_gradient_beside_a_data_input_is_caught():
    def wrong(z, t):
        return torch.nn.functional.binary_cross_entropy_with_logits(1.001 * z, t, reduction="sum") / 1.001
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(wrong, SOFT_TARGETS, seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.check in ("value", "gradient")


@pytest.mark.parametrize("text, message", [
    (SOFT_TARGETS + "\nassert grad(o, t) == 0 * t", "t is a data input: it has no gradient to claim"),
    ("t: Data(Real, Real)[n]\no = sum(t)", "Data takes one domain"),
    ("t: Data(Real)[n]\no = sum(t * t)", "does not depend on any input"),
])
def test_data_inputs_misused_are_spec_errors(text, message):
    with pytest.raises(verify.SpecError, match=message):
        verify.check(text, max_examples=1)


# -- integer inputs: labels and indices ------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CROSS_ENTROPY = (EXAMPLES / "cross_entropy.vspec").read_text()
NLL_OF_LOG_SOFTMAX = "z: Real[b, c]\nt: Integer(0, c)[b]\no = -mean(take(log_softmax(z, axis=1), t))"
ONE_HOT_ENTROPY = "z: Real[b, c]\nt: Integer(0, c)[b]\no = -sum(one_hot(t, c) * log_softmax(z, axis=1)) / b"


class CrossEntropyWithoutTheMean(torch.autograd.Function):
    """A fused cross-entropy whose hand-written backward forgets to divide by the batch."""

    @staticmethod
    def forward(ctx, z, t):
        ctx.save_for_backward(z, t)
        return torch.nn.functional.cross_entropy(z, t)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        return g * (torch.softmax(z, 1) - torch.nn.functional.one_hot(t, z.shape[1]).to(z.dtype)), None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [CROSS_ENTROPY, NLL_OF_LOG_SOFTMAX, ONE_HOT_ENTROPY],
                         ids=["cross_entropy.vspec", "take of log_softmax", "one_hot"])
def test_cross_entropy_with_integer_targets_matches_torch(spec, dtype):
    F = torch.nn.functional
    for fn in (F.cross_entropy, lambda z, t: F.nll_loss(F.log_softmax(z, 1), t),
               lambda z, t: -(F.one_hot(t, z.shape[1]) * F.log_softmax(z, 1)).sum() / z.shape[0]):
        assert verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=15).points > 0
    assert verify.check(spec, dtype=dtype, seed=0, max_examples=15).points > 0


def test_a_cross_entropy_backward_that_forgets_the_mean_is_caught():
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(CrossEntropyWithoutTheMean.apply, CROSS_ENTROPY, seed=0, max_examples=30,
                              modes=("rev",))
    assert caught.value.failure.subject == "∂o/∂z"
    assert "t = torch.tensor([" in caught.value.failure.snippet and "dtype=torch.int64)" in caught.value.failure.snippet


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_picked_by_integers_scatter_their_gradient_back(dtype):
    spec = "E: Real[k, d]\nt: Integer(0, k)[n]\no = sum(E[t] ** 2)"
    assert verify.check_function(lambda E, t: (E[t] ** 2).sum(), spec, dtype=dtype, seed=0, max_examples=20).points
    with pytest.raises(verify.Mismatch) as caught:  # each repeat of a row must add its own gradient
        verify.check_function(lambda E, t: (E[t.unique()] ** 2).sum() * len(t) / len(t.unique()), spec,
                              dtype=dtype, seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.check in ("value", "gradient")


# -- discrete and piecewise ops ---------------------------------------------------------------

QUANTIZE_STE = "x: Real[n]\ny = x + stop_gradient(round(x) - x)\no = sum(y * y)"


class RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class RoundWithRoundsGradient(RoundStraightThrough):
    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)  # round's own derivative: no gradient reaches x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_with_a_straight_through_wrapper_matches_torch(dtype):
    def quantized(x):
        return (RoundStraightThrough.apply(x) ** 2).sum()
    assert verify.check_function(quantized, QUANTIZE_STE, dtype=dtype, seed=0, max_examples=30,
                                 modes=("rev",)).points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: (RoundWithRoundsGradient.apply(x) ** 2).sum(), QUANTIZE_STE, dtype=dtype,
                              seed=0, max_examples=30, modes=("rev",))
    assert caught.value.failure.check == "gradient"


@pytest.mark.shrinks  # the check that fails is the shrunk counterexample's
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_floor_ceil_trunc_and_clamp_match_torch(dtype):
    spec = "x: Real[n]\nlo: Real\nhi: Real\no = sum(floor(x) * x + ceil(x) ** 2 + trunc(x) * clamp(x, lo, hi))"
    def fn(x, lo, hi):
        return (torch.floor(x) * x + torch.ceil(x) ** 2 + torch.trunc(x) * torch.clamp(x, lo, hi)).sum()
    assert verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=30).points > 0
    with pytest.raises(verify.Mismatch) as caught:  # a clamp that lets the gradient through everywhere
        verify.check_function(lambda x: x + (torch.clamp(x, -1, 1) - x).detach() + 0 * x,
                              "x: Real[n]\ny = clamp(x, -1, 1)", dtype=dtype, seed=0, max_examples=30)
    assert caught.value.failure.check in ("gradient", "JVP")


class SortWithoutThePermutation(torch.autograd.Function):
    """torch.sort whose backward hands the gradient to the sorted positions, not back to where each came from."""

    @staticmethod
    def forward(ctx, x):
        return torch.sort(x).values

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sort_and_topk_match_torch(dtype):
    spec = "x: Real[n]\nw: Real[n]\no = sum(sort(x) * w) + sum(topk(x, 2) ** 2)"
    def fn(x, w):
        return (torch.sort(x).values * w).sum() + (torch.topk(x, 2).values ** 2).sum()
    assert verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=30).points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x, w: (SortWithoutThePermutation.apply(x) * w).sum()
                              + (torch.topk(x, 2).values ** 2).sum(), spec, dtype=dtype, seed=0, max_examples=30,
                              modes=("rev",))
    assert caught.value.failure.subject == "∂o/∂x"


SPARSEMAX = (EXAMPLES / "sparsemax.vspec").read_text()


class SparsemaxWithDenseBackward(torch.autograd.Function):
    """sparsemax with the softmax-style backward pasted in: the support is ignored."""

    @staticmethod
    def forward(ctx, z):
        p = sparsemax(z)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return g - (g * p).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparsemax_for_any_n_matches_plain_torch(dtype):
    result = verify.check_function(sparsemax, SPARSEMAX, dtype=dtype, seed=0, max_examples=30)
    assert result.points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(SparsemaxWithDenseBackward.apply, SPARSEMAX, dtype=dtype, seed=0, max_examples=30,
                              modes=("rev",))
    assert caught.value.failure.check == "gradient"


NEAREST_CODE = """x: Real[d]
E: Real[k, d]
q = E[argmin(sum((E - x) ** 2, axis=1))]
y = x + stop_gradient(q - x)
o = sum(y * y) + sum(q * q)"""


def test_a_nearest_codebook_quantizer_with_argmin_matches_torch():
    def quantizer(x, E):
        q = E[torch.argmin(((E - x) ** 2).sum(1))]
        y = x + (q - x).detach()
        return (y * y).sum() + (q * q).sum()
    assert verify.check_function(quantizer, NEAREST_CODE, seed=0, max_examples=30).points > 0
    with pytest.raises(verify.Mismatch) as caught:  # the codebook's own gradient forgotten
        verify.check_function(lambda x, E: quantizer(x, E.detach()), NEAREST_CODE, seed=0, max_examples=30,
                              modes=("rev",))
    assert caught.value.failure.subject == "∂o/∂E"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compound_conditions_in_where_match_torch(dtype):
    spec = "x: Real[n]\ny: Real[n]\no = sum(where(-1 < x < 1 and not y > x or y > 2, x * y, y))"
    def fn(x, y):
        return torch.where(((-1 < x) & (x < 1) & ~(y > x)) | (y > 2), x * y, y).sum()
    assert verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=30).points > 0
    with pytest.raises(verify.Mismatch):  # `or` read as `and`
        verify.check_function(lambda x, y: torch.where(((-1 < x) & (x < 1) & ~(y > x)) & (y > 2), x * y, y).sum(),
                              spec, dtype=dtype, seed=0, max_examples=30)


# -- modules and tuple outputs ----------------------------------------------------------------

# Bounded inputs: x @ W.T overflows float64 from about 1e154 on, in the module as in the spec.
LAYER = ("x: Interval(-100, 100)[b, n]\nlin_weight: Interval(-100, 100)[m, n]\nlin_bias: Interval(-100, 100)[m]\n"
         "o = sum(tanh(x @ lin_weight.T + lin_bias) ** 2)")


class Layer(torch.nn.Module):
    def __init__(self, backward_bias_scale=1.0):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.scale = backward_bias_scale

    def forward(self, x):
        bias = self.lin.bias * self.scale + (self.lin.bias * (1 - self.scale)).detach()
        return (torch.tanh(x @ self.lin.weight.T + bias) ** 2).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_module_is_checked_with_its_parameters_bound_by_name(dtype):
    result = verify.check_function(Layer().to(dtype), LAYER, dtype=dtype, seed=0, max_examples=20)
    assert result.points > 0
    renamed = LAYER.replace("lin_weight", "W").replace("lin_bias", "c")
    assert verify.check_function(Layer().to(dtype), renamed, dtype=dtype, seed=0, max_examples=5,
                                 parameters={"W": "lin.weight", "c": "lin.bias"}).points > 0
    with pytest.raises(verify.Mismatch) as caught:  # the bias's gradient halved
        verify.check_function(Layer(0.5).to(dtype), LAYER, dtype=dtype, seed=0, max_examples=20, modes=("rev",))
    assert caught.value.failure.subject == "∂o/∂lin_bias"
    assert "verify.check_function(Layer, spec, seed=0" in str(caught.value)  # bound by name: nothing more to pass


@pytest.mark.parametrize("text, message", [
    (LAYER.replace("lin_bias: Interval(-100, 100)[m]\n", "").replace(" + lin_bias", ""),
     "lin.bias of Layer are not inputs"),
    (LAYER.replace("[b, n]", "[b, 2]").replace("[m, n]", "[m, 2]"), "lin_weight is declared"),
])
def test_a_module_that_does_not_fit_its_spec_is_a_spec_error(text, message):
    with pytest.raises(verify.SpecError, match=message):
        verify.check_function(Layer(), text, max_examples=1)


MOMENTS = "x: Real[n]\nm = mean(x)\nv = mean((x - m) ** 2)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_function_returning_a_tuple_is_checked_against_named_outputs(dtype):
    assert verify.check_function(lambda x: (x.mean(), x.var(unbiased=False)), MOMENTS, dtype=dtype, seed=0,
                                 max_examples=30, outputs=("m", "v")).points > 0
    with pytest.raises(verify.Mismatch) as caught:  # the second output's gradient dropped
        verify.check_function(lambda x: (x.mean(), x.detach().var(unbiased=False)), MOMENTS, dtype=dtype, seed=0,
                              max_examples=30, outputs=("m", "v"), modes=("rev",))
    assert caught.value.failure.check == "gradient"
    assert "outputs=('m', 'v')" in str(caught.value)


# -- misuse is a SpecError with its place ------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("z: Real[n]\nt: Integer(0, n)[n]\no = sum(t * z)", "t holds integers .* mul takes real numbers"),
    ("z: Real[n]\nt: Integer(0, n)[n]\no = sum(z) + sum(stop_gradient(t))", "t holds integers: it has no gradient to stop"),
    ("z: Real[b, c]\nt: Real[b]\no = sum(take(z, t))", "take takes integers here, and t is not"),
    ("z: Real[b, 3]\nt: Integer(0, 5)[b]\no = sum(take(z, t))", "reach 5 - 1, past axis 1 of z"),
    ("z: Real[b, c]\nt: Integer(-1, c)[b]\no = sum(take(z, t))", "may be negative"),
    ("t: Integer(0, 5)[b]\nz: Real[b, 3]\no = sum(one_hot(t, 3) * z)", "reach 5 - 1, past the classes"),
    ("x: Real[n]\no = sum(topk(x))", "topk needs k"),
    ("t: Integer(3, 3)[n]\nx: Real[n]\no = sum(x)", "is empty"),
    ("t: Integer(0, 2)[n] = [0, 2]\nx: Real[n]\no = sum(x)", "outside its domain"),
    ("x: Real[n]\no = sum(where(x > 0 and x, x, 0))", "the condition of where is a comparison"),
])
def test_integers_misused_are_spec_errors(text, message):
    with pytest.raises(verify.SpecError, match=message):
        verify.check(text, max_examples=1)


class LayerNorm2d(torch.autograd.Function):
    """NAFNet's LayerNormFunction: a channel LayerNorm of NCHW input, with its own backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps=1e-6):
        ctx.eps = eps
        _, channels, _, _ = x.size()
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + eps).sqrt()
        ctx.save_for_backward(y, var, weight)
        return weight.view(1, channels, 1, 1) * y + bias.view(1, channels, 1, 1)

    @staticmethod
    def backward(ctx, grad_output):
        _, channels, _, _ = grad_output.size()
        y, var, weight = ctx.saved_tensors
        g = grad_output * weight.view(1, channels, 1, 1)
        mean_g = g.mean(dim=1, keepdim=True)
        mean_gy = (g * y).mean(dim=1, keepdim=True)
        gx = 1.0 / torch.sqrt(var + ctx.eps) * (g - y * mean_gy - mean_g)
        return gx, (grad_output * y).sum(dim=(0, 2, 3)), grad_output.sum(dim=(0, 2, 3)), None


LAYER_NORM_2D = """x: {x}[b, c, h, w]
g: Real[c]
k: Real[c]
mu = mean(x, axis=1, keepdims=True)
v = mean((x - mu)**2, axis=1, keepdims=True)
y = (x - mu) / sqrt(v + 1/1000000) * reshape(g, shape=(1, c, 1, 1)) + reshape(k, shape=(1, c, 1, 1))"""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_channel_layer_norm_whose_weight_is_reshaped_matches_torch(dtype):
    # Reshape's VJP indexes by (i - k) / c also in its branch not taken: the exact pass used to
    # crash on that index. Below 1e15, (x - mu)**2 stays inside float32's range.
    spec = LAYER_NORM_2D.format(x="Interval(-1e15, 1e15)")
    assert verify.check_function(LayerNorm2d.apply, spec, dtype=dtype, seed=0, max_examples=20,
                                 modes=("rev",)).points > 0


VQ_CODEBOOK = """x: Interval(-1000, 1000)[b, d]
C: Interval(-1000, 1000)[k, d]
dist = sum((reshape(x, shape=(b, 1, d)) - reshape(C, shape=(1, k, d)))**2, axis=2)
y = C[argmin(dist, axis=1)] + x - stop_gradient(x)"""


def test_a_vq_vae_quantizer_whose_argmin_is_near_a_tie_is_judged_exactly_without_an_internal_error():
    # A public VQ-VAE's nearest-codebook lookup with a straight-through gradient. In float32 the
    # distances of some points are within rounding of a tie: the exact pass decides the index,
    # where an index ball that held no single integer used to crash it.
    def quantize(x, codebook):
        distances = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(2)
        return codebook[distances.argmin(1)] + x - x.detach()

    # Seed 0's contiguous draws reach a near tie.
    result = verify.check_function(quantize, VQ_CODEBOOK, dtype=torch.float32, seed=0, max_examples=5,
                                   modes=("rev",), layouts="contiguous")
    assert result.points > 0 and result.exact["judged by the exact pass"] > 0
