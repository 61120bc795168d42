import dataclasses
import os
import zlib

import pytest
import torch
from hypothesis import settings

import verify.api  # noqa: F401 - before pytester's in-process runs, which forget the modules they import
from benchmarks.corpus import ExpIgnoringGradOutput, TanhWithWrongBackward  # noqa: F401 - used by tests
from verify import checks, engine
from verify.ops import REGISTRY
from verify.strategies import Budget

pytest_plugins = ["pytester"]

# The suite's torch calls are tiny and many: on one thread each. Two xdist workers whose thread
# pools spin on the same two cores slowed each other down fifty-fold.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the CLI's subprocesses
# Triton reads TRITON_INTERPRET once, when it is first imported, and torch imports it during a
# check: set before any test runs, so that the Triton examples interpret wherever they run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's own property tests are reproducible by default (a clean clone in CI draws the
# same inputs every run); HYPOTHESIS_PROFILE=explore draws fresh ones, to hunt for new bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# The test profile. "quick" (the default) runs every test with few examples of small batches,
# so that the suite ends in minutes on two cores; "thorough" (VERIFY_TESTS=thorough) runs each
# with the examples and batches it asks for, as users' checks do. A test whose point needs a
# regime that small samples seldom reach says so with @pytest.mark.examples(n): it runs up to
# n examples in both, of users' batches where the spec's own lowering is checked (a function
# called point by point keeps small batches: Hypothesis draws a regime per example).
THOROUGH = os.environ.get("VERIFY_TESTS", "quick") == "thorough"
QUICK_EXAMPLES = 2
QUICK_BATCHED = Budget(elements=2**12, points=2**8)
QUICK_PER_POINT = Budget(elements=2**10, points=2**6)
# Of the points float64 could not settle, the exact pass judges this many per example (users'
# checks: checks.EXACT_POINTS); sure disagreements and torch's non-finite results, all of them.
QUICK_EXACT_POINTS = 1
# Shrinking a failure, and then simplifying its point, stop after this long (users' checks:
# engine.SHRINK_SECONDS and SIMPLIFY_SECONDS); a test that asserts how small or simple the
# counterexample is says so with @pytest.mark.shrinks.
QUICK_SHRINK_SECONDS = 0.25
QUICK_SIMPLIFY_SECONDS = 0.1


def pytest_configure(config):
    config.addinivalue_line("markers", "examples(n): the test needs up to n examples of users' batches per check, "
                                       "even in the quick profile")
    config.addinivalue_line("markers", "shrinks: the test asserts how small or simple the counterexample is: "
                                       "shrinking runs as long as in users' checks, even in the quick profile")
    config.addinivalue_line("markers", "thorough: runs in the thorough profile only (VERIFY_TESTS=thorough)")
    config.addinivalue_line("markers", "one_dtype: in the quick profile, each case runs in float64 or in float32, "
                                       "alternately; in the thorough profile, in both")


def pytest_collection_modifyitems(config, items):
    if THOROUGH:
        return
    skip = pytest.mark.skip(reason="the thorough profile's (VERIFY_TESTS=thorough)")
    for item in items:
        if item.get_closest_marker("thorough") or item.get_closest_marker("one_dtype") and not _quick_dtype(item):
            item.add_marker(skip)


def _quick_dtype(item) -> bool:
    """Whether ``item`` runs in the quick profile: of a case's float64 and float32 runs, the one
    a fixed hash of the case (the test and its other parameters) picks; other dtypes always."""
    params = dict(getattr(item, "callspec", None).params if hasattr(item, "callspec") else {})
    dtype = params.pop("dtype", None)
    if dtype not in (torch.float64, torch.float32):
        return True
    # By name where a parameter has one: a function's repr holds its address, which varies by run.
    case = f"{item.originalname}{sorted((k, getattr(v, '__qualname__', None) or repr(v)) for k, v in params.items())}"
    return dtype == (torch.float64, torch.float32)[zlib.crc32(case.encode()) % 2]


@pytest.fixture(autouse=True)
def test_profile(request, monkeypatch):
    """In the quick profile, every check in this process runs at most QUICK_EXAMPLES examples
    of QUICK_BATCHED points, or as the test's examples mark says."""
    if THOROUGH:
        return
    marked = request.node.get_closest_marker("examples")
    cap = marked.args[0] if marked else QUICK_EXAMPLES
    run = engine.run

    def capped(spec, *, max_examples=100, **options):
        __tracebackhide__ = True
        return run(spec, max_examples=min(max_examples, cap), **options)

    monkeypatch.setattr(engine, "run", capped)
    if not request.node.get_closest_marker("shrinks"):
        monkeypatch.setattr(engine, "SHRINK_SECONDS", min(engine.SHRINK_SECONDS, QUICK_SHRINK_SECONDS))
        monkeypatch.setattr(engine, "SIMPLIFY_SECONDS", min(engine.SIMPLIFY_SECONDS, QUICK_SIMPLIFY_SECONDS))
    # A function called point by point costs per point: its batches stay small even where
    # the regime needs many examples, which draw it per example.
    monkeypatch.setattr(engine, "PER_POINT", QUICK_PER_POINT)
    if not marked:
        monkeypatch.setattr(engine, "BATCHED", QUICK_BATCHED)
        monkeypatch.setattr(checks, "EXACT_POINTS", QUICK_EXACT_POINTS)


@pytest.fixture
def plant_torch_form(monkeypatch):
    """Swap one registry op's torch form for a deliberately wrong one, for this test only."""

    def plant(op_name, torch_form):
        monkeypatch.setitem(REGISTRY, op_name, dataclasses.replace(REGISTRY[op_name], torch_form=torch_form))

    return plant


def planted(forward, backward):
    """A custom autograd.Function from a forward and a backward of (inputs, grad_output)."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return forward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            return backward(*ctx.saved_tensors, grad)

    return Planted.apply


def silu_scaled(scale: float):
    """x * sigmoid(x) as a Function whose hand-written backward is scaled by ``scale``."""
    def backward(x, grad):
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s)) * scale

    return planted(lambda x: x * torch.sigmoid(x), backward)
