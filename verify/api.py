"""The library front: ``parse``, ``load`` and ``check``."""

from __future__ import annotations

from pathlib import Path

import torch

from . import engine
from .errors import SpecError
from .ir import Spec
from .report import Result
from .spec import parse


def load(path: str | Path) -> Spec:
    """Read and parse a spec file. Unreadable or non-UTF-8 files raise ``SpecError``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is no syntax error
    except UnicodeDecodeError as exc:
        raise SpecError(f"the file is not UTF-8 text (byte {exc.start})", path=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read the file: {exc.strerror}", path=str(path)) from None
    return parse(text, path=str(path))


def check(spec: str | Spec, *, max_examples: int = 100, seed: int | None = None,
          dtype: torch.dtype = torch.float64) -> Result:
    """Check that torch's autograd agrees with sympy on ``spec``, over Hypothesis-drawn points.

    ``spec`` is spec text or a parsed ``Spec``. Compared: the value of every named node,
    ∂o/∂v for every input and named intermediate, and every claim (proved symbolically
    when sympy can, and always checked at the points). Points where the math is undefined
    or overflows ``dtype`` are rejected and counted, never failed.

    Returns a ``Result`` (``.points``, ``.rejected``, ``.claims``). Raises ``Mismatch`` (an
    ``AssertionError``) with the shrunk counterexample, or ``SpecError`` for a bad spec.

    >>> result = check("x: Real[n]\\ny = x**2\\no = 1/2 * sum(y)\\nassert grad(o, x) == x", seed=0)
    >>> result.claims[0].status
    'proved for all sizes'
    """
    __tracebackhide__ = True
    parsed = parse(spec) if isinstance(spec, str) else spec
    return engine.run(parsed, max_examples=max_examples, seed=seed, dtype=dtype)
