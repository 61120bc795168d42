"""One planted mutant per class and dtype, from benchmarks/mutations.py: each is torch's own
backward, changed the way a hand-written gradient goes wrong, and each must be caught. The
benchmark runs every class over every registry op; these keep one of each in the suite."""

import pytest
import torch

import verify
from benchmarks import mutations
from benchmarks.calibration import SPECS
from verify import engine
from verify.tolerance import UNIT_ROUNDOFF

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _op_mutant(op: str, change):
    return lambda dtype: (mutations.wrapped(mutations.torch_function(SPECS[op]), change(dtype)), SPECS[op])


def _special(kind: str, op: str):
    (mutant,) = [m for m in mutations.special_mutants() if (m.kind, m.op) == (kind, op)]
    return lambda dtype: (mutant.fn, mutant.spec)


CLASSES = {
    "zero": _op_mutant("tanh", lambda dtype: mutations.masked(1.0, torch.zeros_like)),
    "flip": _op_mutant("sigmoid", lambda dtype: mutations.masked(1.0, torch.neg)),
    "scale": _op_mutant("exp", lambda dtype: mutations.scaled(1 + mutations.SCALE_ULPS * UNIT_ROUNDOFF[dtype])),
    "drop": _special("drop", "softmax"),
    "nan-patch": _special("nan-patch", "softplus"),
    "overflow": _special("overflow", "cube"),
}


@pytest.mark.examples(20)  # the regime of some (tanh past 1 in bfloat16) takes a few examples to draw
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", CLASSES)
def test_a_planted_mutant_of_each_class_is_caught(kind, dtype, monkeypatch):
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)  # caught is the point, not how small
    monkeypatch.setattr(engine, "SIMPLIFY_SECONDS", 0.0)
    fn, spec = CLASSES[kind](dtype)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(fn, spec, dtype=dtype, modes=("rev",), max_examples=100, seed=0, rows=True)
    assert caught.value.failure.check == "gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_torchs_own_backward_wrapped_as_a_function_passes(dtype):
    fn, spec = _op_mutant("tanh", lambda dtype: None)(dtype)
    assert verify.check_function(fn, spec, dtype=dtype, modes=("rev",), max_examples=30, seed=0,
                                 rows=True).points > 0
