import dataclasses
import os

import pytest
import torch
from hypothesis import settings

from verify.ops import REGISTRY

# The suite's own property tests are reproducible by default (a clean clone in CI draws the
# same inputs every run); HYPOTHESIS_PROFILE=explore draws fresh ones, to hunt for new bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def plant_torch_form(monkeypatch):
    """Swap one registry op's torch form for a deliberately wrong one, for this test only."""

    def plant(op_name, torch_form):
        monkeypatch.setitem(REGISTRY, op_name, dataclasses.replace(REGISTRY[op_name], torch_form=torch_form))

    return plant


class TanhWithWrongBackward(torch.autograd.Function):
    """tanh whose backward forgets the square: g * (1 - y) instead of g * (1 - y**2)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        return grad_output * (1 - y)


class ExpIgnoringGradOutput(torch.autograd.Function):
    """exp whose backward returns exp(x) whatever gradient flows in."""

    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        return y.clone()
