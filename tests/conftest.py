import dataclasses
import os

import pytest
import torch
from hypothesis import settings

import verify.api  # noqa: F401 - before pytester's in-process runs, which forget the modules they import
from benchmarks.corpus import ExpIgnoringGradOutput, TanhWithWrongBackward  # noqa: F401 - used by tests
from verify.ops import REGISTRY

pytest_plugins = ["pytester"]

# The suite's torch calls are tiny and many: on one thread each. Two xdist workers whose thread
# pools spin on the same two cores slowed each other down fifty-fold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the CLI's subprocesses

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
