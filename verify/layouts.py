"""Memory layouts user code is handed: the same values, strided as torch hands tensors in training.

A kernel that reads ``x`` or ``dy`` with assumed row-major strides passes every contiguous check
and fails in training, where ``y.sum().backward()`` hands down an expanded ``dy`` (stride 0) and
a transpose or a slice gives a strided view. ``check_function`` draws one layout per example for
the inputs and the cotangent it hands the function; the values stay those drawn, so a failure
under a layout and not contiguous is a layout bug.
"""

from __future__ import annotations

import torch

# Drawn in this order: Hypothesis shrinks a failure toward the first, contiguous.
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded", "channels_last")
CHOICES = ("drawn", "contiguous")

# How each layout is made from a tensor named {t}, for a report and its snippet.
MADE = {
    "transposed": "{t}.transpose(-1, -2).contiguous().transpose(-1, -2)",
    "strided": "torch.stack([{t}, torch.zeros_like({t})], -1)[..., 0]",
    "offset": "torch.cat([{t}.new_zeros(1), {t}.flatten()])[1:].view({t}.shape)",
    "expanded": "{t}[..., :1].expand_as({t})",
    "channels_last": "{t}.contiguous(memory_format=torch.channels_last)",
}


def view_code(layout: str, name: str, shape: tuple, cotangent: bool = False) -> str | None:
    """Python that makes ``name``'s tensor (of ``shape``) in ``layout``, for a report's
    snippet; None where the layout leaves it as it is."""
    return MADE[layout].format(t=name) if applies(layout, shape, cotangent) else None


def applies(layout: str, shape: tuple, cotangent: bool = False, rows: bool = False) -> bool:
    """Whether ``layout`` changes a tensor of ``shape`` (an input, or the cotangent). With
    ``rows`` its leading axis stacks points, which an expanded cotangent must not repeat."""
    if layout == "transposed":
        return len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1
    if layout in ("strided", "offset"):
        return len(shape) >= 1
    if layout == "expanded":
        return cotangent and len(shape) > rows and shape[-1] > 1
    if layout == "channels_last":
        return len(shape) == 4
    return False


def laid_out(tensor: torch.Tensor, layout: str, cotangent: bool = False, rows: bool = False) -> torch.Tensor:
    """``tensor``'s values in ``layout`` (a differentiable view of them, so gradients reach the
    tensor); as it is where the layout does not apply to its shape (``applies``)."""
    if not applies(layout, tuple(tensor.shape), cotangent, rows):
        return tensor
    if layout == "transposed":
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        return torch.stack([tensor, torch.zeros_like(tensor)], -1)[..., 0]
    if layout == "offset":
        return torch.cat([tensor.new_zeros(1), tensor.flatten()])[1:].view(tensor.shape)
    if layout == "expanded":  # the drawn cotangent is constant along its last axis (strategies.examples)
        return tensor[..., :1].expand_as(tensor)
    return tensor.contiguous(memory_format=torch.channels_last)
