"""The model building blocks in examples/, each checked against torch's own implementation in
float64 and float32, and with a gradient bug planted in torch's result, which must be caught."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import verify

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DTYPES = [torch.float64, torch.float32]
pytestmark = pytest.mark.one_dtype  # the quick profile runs each case in one of them


def sparsemax(z):
    """Sparsemax in plain torch, as entmax's reference writes it."""
    s = torch.sort(z, descending=True).values
    k = torch.arange(1, len(z) + 1, dtype=z.dtype)
    support = (1 + k * s > s.cumsum(0)).sum()
    tau = (s.cumsum(0)[support - 1] - 1) / support
    return torch.clamp(z - tau, min=0)


def quantize_ste(x):
    return x + (torch.round(x) - x).detach()


class Scaled(torch.autograd.Function):
    """The identity forward whose backward scales one input's gradient by half again: the planted bug."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return 1.5 * g


def _wrong_gradients(fn):
    """``fn`` with every floating input's gradient 50% off, so that a saturated softmax, whose
    gradient toward q vanishes in float32, cannot hide the bug at every drawn point."""
    return lambda *args: fn(*(Scaled.apply(a) if a.is_floating_point() else a for a in args))


# (example, torch's own function, sizes that keep a CI run short)
CASES = {
    "attention": (F.scaled_dot_product_attention, {"b": 2, "t": 3}),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5), {}),
    "conv1d": (F.conv1d, {"b": 2}),
    "cross_entropy": (F.cross_entropy, {}),
    "sparsemax": (sparsemax, {}),
    "quantize_ste": (quantize_ste, {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_matches_torch(name, dtype):
    fn, sizes = CASES[name]
    spec = verify.load(EXAMPLES / f"{name}.vspec")
    assert [*spec.inputs][:2] == {"attention": ["q", "k"], "layer_norm": ["x", "w"], "conv1d": ["x", "w"],
                                  "cross_entropy": ["z", "t"], "sparsemax": ["z"], "quantize_ste": ["x"]}[name]
    result = verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=8, sizes=sizes, modes=("rev",))
    assert result.points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(_wrong_gradients(fn), spec, dtype=dtype, seed=0, max_examples=8, sizes=sizes,
                              modes=("rev",))
    assert caught.value.failure.check == "gradient"


def test_every_example_is_tested():
    assert {path.stem for path in EXAMPLES.glob("*.vspec")} == {*CASES, "backprop"}
