"""The library front: ``parse``, ``load`` and ``check``."""

from __future__ import annotations

from pathlib import Path

import torch

from . import binding, engine
from .errors import Mismatch, SpecError
from .ir import Spec
from .report import Result
from .spec import parse
from .trace import trace


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
          dtype: torch.dtype = torch.float64, order: int = 1, modes=("rev", "fwd"), device: str = "cpu",
          database: str | Path | None = None, derandomize: bool = False, sizes: dict | None = None,
          time_budget: float | None = None, require_power: bool = False) -> Result:
    """Check that torch's autograd agrees with sympy on ``spec``, over Hypothesis-drawn points.

    ``spec`` is spec text or a parsed ``Spec``. Compared at every point: the value of every
    named node; with ``"rev"`` in ``modes``, the vector-Jacobian product into every input
    and named intermediate, for a random cotangent; with ``"fwd"``, the Jacobian-vector
    product of the output for random tangents; with ``order=2``, Hessian-vector products
    (double backward, and forward over reverse); and every claim (proved symbolically
    when sympy can, and always checked at the points). Points where the math is undefined
    or overflows ``dtype`` are rejected and counted, never failed.

    ``database`` is a directory where failing examples are kept and replayed first by the
    next call (none by default: a library call writes no files unless asked). ``derandomize``
    derives the seed from the spec text, so that every run draws the same inputs. ``sizes``
    fixes size symbols, e.g. ``{"n": 1000}``; the others are drawn (1 to 8, now and then up
    to 64). With ``time_budget`` (seconds, planning included), no new example is drawn once
    it is spent; the result says how many ran (``Result.examples``, ``Result.budget_spent``).
    An element is judged weakly where its allowance is at least its exact value (a zero would
    pass there too); the result counts them (``Result.weak``) and warns where most of a check's
    elements are weak, rejected or unjudged; ``require_power`` fails the run there instead.

    Returns a ``Result`` (``.points``, ``.rejected``, ``.weak``, ``.claims``). Raises ``Mismatch``
    (an ``AssertionError``) with the shrunk counterexample, ``Unsupported`` when a mode or the
    dtype cannot be checked, ``Unchecked`` when no point could be, ``Inconclusive`` when the
    checks could not decide, or ``SpecError``.

    >>> result = check("x: Real[n]\\ny = x**2\\no = 1/2 * sum(y)\\nassert grad(o, x) == x", seed=0)
    >>> result.claims[0].status
    'proved for all n'
    """
    __tracebackhide__ = True
    parsed = parse(spec) if isinstance(spec, str) else spec
    return engine.run(parsed, max_examples=max_examples, seed=seed, dtype=dtype, order=order, modes=modes,
                      device=device, database=database, derandomize=derandomize, sizes=sizes,
                      time_budget=time_budget, require_power=require_power)


def check_function(fn, spec: str | Spec | None = None, *, reference=None, example_inputs=None,
                   domains: dict | None = None, dtype: torch.dtype = torch.float64, order: int = 1,
                   modes=("rev", "fwd"), max_examples: int = 100, seed: int | None = None,
                   device: str = "cpu", database: str | Path | None = None, derandomize: bool = False,
                   sizes: dict | None = None, kinks: str = "any", rtol: float = 0.0, atol: float = 0.0,
                   outputs: tuple | None = None, parameters: dict | None = None,
                   time_budget: float | None = None, rows: bool = False,
                   compute_dtype: torch.dtype | None = None, require_power: bool = False,
                   layouts: str = "drawn") -> Result:
    """Check ``fn`` (a custom ``autograd.Function``'s ``apply``, a fused op, a module) against
    the math of ``spec``.

    ``fn`` takes the spec's inputs as positional tensors, in declaration order, and returns
    the output. Its value, its VJPs for random cotangents, its JVPs for random tangents
    (``"fwd"``) and, with ``order=2``, its Hessian-vector products are compared with
    sympy's derivatives of the spec. An exception in ``fn`` or its backward, a gradient of
    the wrong shape, or NaN where the math is finite is a ``Mismatch`` at the input that
    triggers it. A Function without forward-mode support raises ``Unsupported``, after
    everything else was checked; pass ``modes=("rev",)`` to check reverse mode only.
    At a point exactly on a kink (relu at 0, a tie of a maximum), a derivative may take
    either side's value, or torch's convention there; ``kinks="torch"`` demands torch's.
    Code that knowingly trades accuracy states it: ``rtol`` and ``atol`` add
    ``rtol * |reference| + atol`` to every comparison's allowance, as ``assert_close`` would.
    ``database``, ``derandomize``, ``sizes``, ``time_budget`` and ``require_power`` are as for
    ``check``.

    A kernel that launches per call is checked fastest with ``rows=True``: ``fn`` then takes
    every input with a leading axis of independent points (row k of each is point k) and
    returns the output with it, and many points go in one call. The first points of each
    batch are also called alone (a stack of one); where they differ, the stacked results are
    judged, and a failure says that they differed (the rows may not be independent). A kernel that loads ``dtype`` but computes in a
    wider dtype says so with ``compute_dtype=torch.float32``: its steps are then allowed
    that dtype's roundings, plus one rounding of each result to ``dtype`` (see
    ``verify.tolerance``), which catches a kernel that computes in ``dtype`` by mistake.

    An ``nn.Module`` is checked with its parameters as spec inputs: each binds the input
    named as it is (dots made underscores; ``parameters={"W": "0.weight"}`` binds by hand),
    their gradients are compared too, and their shapes fix the sizes they use. ``forward``
    takes the other inputs. A function that returns a tuple names the spec's nodes it
    returns, in order: ``outputs=("mean", "var")``.

    The inputs and the cotangent reach ``fn`` in a memory layout drawn per example:
    contiguous, a transposed view, a slice with a step, a storage offset, a cotangent expanded
    along an axis (stride 0, as ``sum()``'s backward hands it down), or channels-last. The
    values are the same, so a failure under a layout is a layout bug, and its report names the
    layout. ``layouts="contiguous"`` hands every tensor contiguous.

    Instead of ``spec``, ``reference=`` takes the plain-torch function the kernel must match,
    traced at ``example_inputs`` into a spec (``verify.spec_from``, with ``domains``); a
    failure's report shows that spec. Where the reference casts up (``x.float()``) and
    ``compute_dtype`` is not given, the kernel is taken to compute in that dtype too.

    >>> import torch
    >>> check_function(torch.tanh, "x: Real[n]\\ny = tanh(x)", seed=0).points > 0
    True
    """
    __tracebackhide__ = True
    traced = None
    if reference is not None:
        if spec is not None:
            raise TypeError("check_function takes a spec or a reference=, not both")
        traced = trace(reference, tuple(example_inputs or ()), domains=domains)
        spec = traced.spec
        if compute_dtype is None and traced.compute_dtype is not None and \
                torch.finfo(traced.compute_dtype).bits > torch.finfo(dtype).bits:
            compute_dtype = traced.compute_dtype
    elif spec is None:
        raise TypeError("check_function needs a spec, or a reference= to trace one from")
    parsed = parse(spec) if isinstance(spec, str) else spec
    if isinstance(fn, torch.nn.Module):
        fn, fixed = binding.bind_module(fn, parsed, parameters)
        sizes = {**fixed, **(sizes or {})}
    elif parameters is not None:
        raise TypeError("parameters= binds a module's parameters; fn is no nn.Module")
    if outputs is not None:
        fn, parsed = binding.combine_outputs(fn, parsed, tuple(outputs))
    try:
        return engine.run(parsed, fn=fn, max_examples=max_examples, seed=seed, dtype=dtype, order=order, modes=modes,
                          device=device, database=database, derandomize=derandomize, sizes=sizes, kinks=kinks,
                          rtol=rtol, atol=atol, time_budget=time_budget, rows=rows, compute_dtype=compute_dtype,
                          require_power=require_power, layouts=layouts)
    except Mismatch as mismatch:
        if traced is None:
            raise
        raise Mismatch(f"{mismatch}\n\nthe spec traced from the reference:\n{traced.text}", mismatch.failure,
                       mismatch.result) from None
