"""Plain-torch references, written as Hugging Face-style model code writes them, for
``verify.spec_from`` and ``check_function(kernel, reference=...)``.

    verify trace examples.references:rmsnorm --shape x=4,8 --shape w=8 --dtype bfloat16
"""
import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def rmsnorm(x, w):
    """LlamaRMSNorm.forward: computed in float32, stored back in the input's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(dtype)


def swiglu(x, gate, up, down):
    """A SwiGLU MLP: down(silu(gate(x)) * up(x)), weights as nn.Linear stores them."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def rotary(x, cos, sin):
    """A rotary embedding that rotates halves with cat and slices."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def smoothed_cross_entropy(z, t):
    """Cross-entropy over (batch, classes) logits with label smoothing; ignore_index (-100)
    lies outside the classes the targets are drawn from."""
    return F.cross_entropy(z, t, label_smoothing=0.1, ignore_index=-100)


def cross_entropy(z, t):
    return F.cross_entropy(z, t)


def gelu_tanh(x):
    """GELU's tanh approximation, as GPT-2's code writes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)
