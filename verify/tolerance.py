"""The tolerance rule: how far torch may be from the exact reference, per dtype and point.

A comparison at one element allows::

    allowed = SAFETY * u(dtype) * (|reference| + error_bound) + SAFETY * tiny(dtype)

* ``u(dtype)`` is the unit roundoff of the dtype torch computed in (below).
* ``error_bound`` comes from ``verify.reference``: a first-order bound, in units of u, on
  the rounding error of evaluating the formula in floating point. It grows where the
  point is sensitive: terms that cancel, ``exp`` of a large argument, long sums. A
  well-conditioned point has ``error_bound`` near ``|reference|`` and is held tight.
* ``SAFETY`` covers that torch's kernels round in a different order from the formula and
  take a few more steps (``pow``'s backward is ``n * x**(n-1)`` times the incoming
  gradient). It is a constant of the rule, never tuned per spec.
* ``tiny(dtype)``, the smallest normal number, absorbs results that underflow.

The inputs are exactly representable in the dtype, yet the bound gives each of them one
rounding: a correct algorithm returns the exact result for inputs perturbed that much
(backward stability), so the bound includes the condition number of the formula at the
point. logcumsumexp computed by shifting its arguments, at x = 219, needs that room.
Claims compare two float64 formulas, so they use the float64 row.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SAFETY = 16.0


def allowed_error(reference: np.ndarray, error_bound: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The largest |torch - reference| accepted at each element, by the rule above."""
    u = UNIT_ROUNDOFF[dtype]
    return SAFETY * u * (np.abs(reference) + error_bound) + SAFETY * torch.finfo(dtype).tiny


# Values within this factor of the dtype's overflow or underflow threshold are too close to
# call: torch's order of operations may cross it where the formula's does not. float16 has
# 30 binades in all, so it gets a narrower margin.
EDGE_MARGIN = 2.0**10
EDGE_MARGIN_FLOAT16 = 2.0**4


def _edge_margin(dtype: torch.dtype) -> float:
    return EDGE_MARGIN_FLOAT16 if dtype == torch.float16 else EDGE_MARGIN


def representable_limit(dtype: torch.dtype) -> float:
    """Reference values beyond this count as overflow of the dtype (the edge margin below max)."""
    return float(torch.finfo(dtype).max) / _edge_margin(dtype)


def underflow_limit(dtype: torch.dtype) -> float:
    """Nonzero values below this count as underflow of the dtype (the edge margin above tiny)."""
    return float(torch.finfo(dtype).tiny) * _edge_margin(dtype)
