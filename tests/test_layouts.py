"""Memory layouts drawn for user code: the same values, strided as torch hands tensors in training."""

import pytest
import torch

import verify
from verify import layouts, strategies

from .conftest import planted

# A square whose backward flattens dy with view(-1), which needs it contiguous.
_VIEWING_THE_COTANGENT = planted(lambda x: x * x, lambda x, g: (2 * x.reshape(-1) * g.view(-1)).view(x.shape))
# tanh whose backward reads dy's memory with row stride n, as a kernel indexing row * n + col does.
_READING_ROW_MAJOR = planted(torch.tanh, lambda x, g: torch.as_strided(g, g.shape, (g.shape[-1], 1),
                                                                       g.storage_offset()) * (1 - torch.tanh(x) ** 2))


@pytest.mark.parametrize("fn, spec", [
    (_VIEWING_THE_COTANGENT, "x: Real[m, n]\ny = x * x"),
    (_READING_ROW_MAJOR, "x: Real[m, n]\ny = tanh(x)"),
], ids=["view(-1)", "row-major read"])
def test_a_backward_that_assumes_a_layout_is_caught_by_default_naming_it_and_passes_when_handed_contiguous(fn, spec):
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, modes=("rev",), seed=0)
    failure = caught.value.failure
    assert failure.check == "gradient"
    note = next(note for note in failure.notes if note.startswith("layout:"))
    assert any(f" {name}: " in note for name in layouts.LAYOUTS[1:])
    assert "_laid_out" in failure.snippet  # the snippet hands the tensors in the same layout
    assert verify.check_function(fn, spec, modes=("rev",), seed=0, layouts="contiguous").points > 0


class _ViewingTheTangent(torch.autograd.Function):
    """2x, whose forward-mode rule flattens the tangent with view(-1)."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        return (t.view(-1) * 2).view(t.shape)


def test_forward_mode_meets_the_layouts_too_and_its_snippet_makes_them():
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(_ViewingTheTangent.apply, "x: Real[m, n]\ny = 2 * x", modes=("fwd",), seed=0)
    assert caught.value.failure.check == "JVP" and "# the layout it was handed in" in caught.value.failure.snippet
    assert verify.check_function(_ViewingTheTangent.apply, "x: Real[m, n]\ny = 2 * x", modes=("fwd",), seed=0,
                                 layouts="contiguous").points > 0


def test_each_layout_keeps_the_values_and_gradients_reach_the_tensor():
    x = torch.arange(24.0).reshape(2, 3, 4).requires_grad_()
    for layout in layouts.LAYOUTS:
        viewed = layouts.laid_out(x, layout, cotangent=layout == "expanded")
        if layout == "expanded":
            assert viewed.stride()[-1] == 0
            continue
        assert torch.equal(viewed, x)
        (grad,) = torch.autograd.grad(viewed.sum(), x)
        assert torch.equal(grad, torch.ones_like(x))
    assert not layouts.laid_out(x, "transposed").is_contiguous()
    assert layouts.laid_out(x, "offset").storage_offset() == 1
    assert layouts.laid_out(torch.zeros(2, 3, 4, 5), "channels_last").is_contiguous(
        memory_format=torch.channels_last)


def test_the_code_a_report_shows_makes_the_layout_the_function_was_handed():
    t = torch.arange(120.0).reshape(2, 3, 4, 5)
    for layout, code in layouts.MADE.items():
        namespace = {"torch": torch, "t": t}
        exec(f"made = {code.format(t='t')}", namespace)  # our own template, in a test
        handed = layouts.laid_out(t, layout, cotangent=True)
        assert namespace["made"].stride() == handed.stride() and torch.equal(namespace["made"], handed), layout


def test_a_correct_function_passes_whatever_the_layout():
    assert verify.check_function(lambda x: torch.tanh(x) @ x.T, "x: Real[m, n]\ny = tanh(x) @ x.T",
                                 modes=("rev",), seed=0).points > 0


def test_stacked_rows_get_their_cotangent_expanded_within_a_row_never_across_rows():
    scalar_per_row = torch.arange(3.0)
    assert layouts.laid_out(scalar_per_row, "expanded", cotangent=True, rows=True) is scalar_per_row
    assert layouts.laid_out(torch.ones(3, 4), "expanded", cotangent=True, rows=True).stride() == (4, 0)
    # A dot per row: its stacked cotangent must keep each row's own value under every layout.
    assert verify.check_function(lambda x, z: (x * z).sum(-1), "x: Real[n]\nz: Real[n]\ny = dot(x, z)", rows=True,
                                 modes=("rev",), seed=0).points > 0


def test_large_sizes_are_drawn_at_block_edges_half_the_time():
    # One branch in two: the powers of two and their neighbours within the bound, or any size.
    assert repr(strategies._block_edges(9, 64)) == ("one_of(sampled_from([9, 15, 16, 17, 31, 32, 33, 63, 64]), "
                                                    "integers(min_value=9, max_value=64))")


def test_layouts_takes_drawn_or_contiguous():
    with pytest.raises(ValueError, match="layouts is one of drawn, contiguous"):
        verify.check_function(torch.tanh, "x: Real[n]\ny = tanh(x)", layouts="rowmajor")
