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

The inputs are exactly representable in the dtype, so they carry no error of their own.
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


def representable_limit(dtype: torch.dtype) -> float:
    """The largest finite value of the dtype: reference values beyond it are overflow."""
    return float(torch.finfo(dtype).max)
