"""Hypothesis strategies: sizes for size symbols, values inside each input's domain, batches.

Every value is exactly representable in the dtype under test, so torch and the float64
reference start from the same numbers and every difference comes from the computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .ir import Domain, Spec, concrete_shape

DEFAULT_SIZES = (1, 8)
MAX_BATCH = 8
# Magnitudes stay where the float64 reference is finite for the ops of the core set.
MAX_MAGNITUDE = 100.0
COTANGENT_MAGNITUDE = 4.0
FLOAT_WIDTH = {torch.float64: 64, torch.float32: 32, torch.float16: 16}


@dataclass(frozen=True)
class Example:
    """One Hypothesis example: sizes, and a batch of points (input name -> float64 array)."""

    sizes: dict
    inputs: dict
    cotangent: np.ndarray | None = None

    @property
    def batch(self) -> int:
        return len(next(iter(self.inputs.values())))


def _round_inward(bound: float, dtype: torch.dtype, upward: bool) -> float:
    """The nearest dtype-representable value at or inside ``bound``."""
    if math.isinf(bound):
        return bound
    as_dtype = float(torch.tensor(bound, dtype=dtype))
    if (as_dtype < bound) if upward else (as_dtype > bound):
        as_dtype = float(torch.nextafter(torch.tensor(as_dtype, dtype=dtype),
                                         torch.tensor(math.inf if upward else -math.inf, dtype=dtype)))
    return as_dtype


def values(domain: Domain, dtype: torch.dtype) -> st.SearchStrategy:
    """Floats inside ``domain`` (and within MAX_MAGNITUDE), exactly representable in ``dtype``."""
    low = _round_inward(max(domain.low, -MAX_MAGNITUDE), dtype, upward=True)
    high = _round_inward(min(domain.high, MAX_MAGNITUDE), dtype, upward=False)
    return st.floats(low, high, exclude_min=domain.low_open and low == domain.low,
                     exclude_max=domain.high_open and high == domain.high,
                     allow_nan=False, allow_infinity=False, allow_subnormal=False, width=FLOAT_WIDTH[dtype])


@st.composite
def examples(draw, spec: Spec, dtype: torch.dtype, cotangent_shape=None, sizes=None) -> Example:
    """Sizes for the size symbols not fixed by ``sizes``, then a batch of points."""
    chosen = dict(sizes or {})
    for name in spec.size_symbols:
        if name not in chosen:
            chosen[name] = draw(st.integers(*DEFAULT_SIZES), label=f"size {name}")
    batch = draw(st.integers(1, MAX_BATCH), label="points")
    inputs = {}
    for name, declared in spec.inputs.items():
        shape = (batch, *concrete_shape(declared.shape, chosen))
        inputs[name] = draw(hnp.arrays(np.float64, shape, elements=values(declared.domain, dtype)), label=name)
    cotangent = None
    if cotangent_shape is not None:
        shape = (batch, *concrete_shape(cotangent_shape, chosen))
        bounded = st.floats(-COTANGENT_MAGNITUDE, COTANGENT_MAGNITUDE, width=FLOAT_WIDTH[dtype], allow_subnormal=False)
        cotangent = draw(hnp.arrays(np.float64, shape, elements=bounded), label="cotangent")
    return Example(chosen, inputs, cotangent)
