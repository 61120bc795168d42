"""Constructs that real gradient code needs (the "real code" issues), each checked against
torch's own code where it has one, in float64 and float32."""

import pytest
import torch

import verify

DTYPES = [torch.float64, torch.float32]


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

SOFT_TARGETS = "z: Real[n]\nt: Data(Interval(0, 1))[n]\no = sum(-t * log(sigmoid(z)) - (1 - t) * log(1 - sigmoid(z)))"


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
