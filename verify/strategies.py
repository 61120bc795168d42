"""Hypothesis strategies: sizes for size symbols, values inside each input's domain, batches.

Every value is exactly representable in the dtype under test, so torch and the float64
reference start from the same numbers and every difference comes from the computation.
Values mix ordinary magnitudes with the whole range of the dtype, up to where it
overflows, because gradient bugs live at thresholds and near overflow too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy
import torch
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .errors import SpecError
from .ir import Apply, Domain, Spec, concrete_shape, graph_nodes
from .layouts import LAYOUTS
from .ops import REGISTRY
from .spec import MAX_POINT_ELEMENTS

DEFAULT_SIZES = (1, 8)
# Now and then sizes are drawn up to LARGE_SIZE, so that torch's code paths for larger
# tensors run too: for symbols that only vectors and matrices use, within an element budget
# per point. A slice's requirement may ask for up to LARGE_SIZE as well.
LARGE_SIZE = 64
LARGE_ODDS = 4  # to 1: examples with the usual sizes, to those with large ones
LARGE_ELEMENTS = 2**13
MAX_BATCH = 8
# A point holds at most MAX_POINT_ELEMENTS (the parser's bound at the smallest sizes; larger
# drawn sizes are halved to fit), and a batch of several points at most BATCH_ELEMENTS: each
# element costs the reference and torch a few float64 arrays, so a batch stays within a few GB.
BATCH_ELEMENTS = 2**23


@contextlib.contextmanager
def draws_by_seed_alone():
    """Hypothesis mixes into its draws, one in twenty, literal constants of whichever local
    modules are loaded (``hypothesis.internal.conjecture.providers``): the same seed drew
    differently in a script, under pytest and beside a benchmark, and a reproduction line
    could miss its failure. Inside this block the pool holds Hypothesis's own constants only."""
    from hypothesis.internal.conjecture import providers  # private; versions without it draw by seed alone

    loaded = getattr(providers, "_get_local_constants", None)
    if loaded is None:
        yield
        return
    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()  # pools computed with local constants
    try:
        yield
    finally:
        providers._get_local_constants = loaded
        providers.CONSTANTS_CACHE.cache.clear()


@dataclass(frozen=True)
class Budget:
    """An example carries up to as many points as fit in ``elements`` input elements, and at
    most ``points``, so that per-example costs spread over many points."""

    elements: int
    points: int


# The spec's own lowering evaluates a whole batch in one torch call; a user's function is
# called once per point, where a large batch buys nothing and costs Python calls.
BATCHED = Budget(elements=2**16, points=2**12)
PER_POINT = Budget(elements=2**12, points=2**10)
# A row-wise kernel takes a batch in one call, yet some kernels cost time per row (Triton's
# interpreter: about 10 ms a row for a forward and backward): stacks of 32 points keep a
# default check within seconds there, and cost a GPU nothing.
ROWS = Budget(elements=2**12, points=2**5)
# Arrays up to this many elements are drawn element by element, which shrinks best; larger
# ones are materialized by numpy from what Hypothesis draws (a seed, a magnitude regime, and
# special values with their positions), so a 10**6-element input costs a few draws.
DRAWN_ELEMENTS = 256
MATERIALIZED_SPECIALS = 8
BULK_ODDS = 7  # to 1: examples with a bulk of materialized points, to those with only a few
ORDINARY_MAGNITUDE = 10.0
THRESHOLD_DECADES = 3  # scales up to 10**3: values up to 10**4
# Cotangents and tangents: signs, zero and a spread of magnitudes, exact in every dtype, and
# no tiny values that would push the reference's products into subnormal numbers. They shrink
# to 1, so a minimal counterexample shows the direction only where it matters (a backward
# that ignores its incoming gradient passes at 1 and fails elsewhere).
DIRECTION_VALUES = (1.0, -1.0, 2.0, 0.5, -3.0, 0.0, 0.25, -4.0, 1.5, -0.75)
DIRECTIONS = st.sampled_from(DIRECTION_VALUES)
FLOAT_WIDTH = {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 32}


@dataclass(frozen=True)
class Example:
    """One Hypothesis example: sizes, a batch of points (input name -> float64 array), the
    cotangent seeded into backward (batch, *output shape), and tangents per input."""

    sizes: dict
    inputs: dict
    cotangent: np.ndarray
    tangents: dict | None = None
    layout: str = "contiguous"  # how user code is handed the inputs and cotangent (verify.layouts)

    @property
    def batch(self) -> int:
        return len(next(iter(self.inputs.values())))

    def __repr__(self) -> str:
        # Hypothesis prints a failing example's repr; verify's own report shows the point, and
        # the repr of a bulk of points would run to megabytes.
        return f"Example(sizes={self.sizes}, points={self.batch})"

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis's printer would spell out each field
        printer.text(repr(self))

    def joined(self, other: Example) -> Example:
        """The points of both examples, which have the same sizes."""
        tangents = None if self.tangents is None else {n: np.concatenate([t, other.tangents[n]])
                                                       for n, t in self.tangents.items()}
        return Example(self.sizes, {n: np.concatenate([a, other.inputs[n]]) for n, a in self.inputs.items()},
                       np.concatenate([self.cotangent, other.cotangent]), tangents, self.layout)

    def with_unit_directions(self) -> Example:
        """The same points, every direction (cotangent, tangent) of magnitude 1, its sign kept."""
        def unit(array):
            return np.where(array < 0, -1.0, 1.0)

        tangents = None if self.tangents is None else {n: unit(t) for n, t in self.tangents.items()}
        return Example(self.sizes, self.inputs, unit(self.cotangent), tangents, self.layout)

    def at(self, keep: np.ndarray) -> Example:
        """The points where ``keep`` is true."""
        if keep.all():
            return self
        tangents = None if self.tangents is None else {n: t[keep] for n, t in self.tangents.items()}
        return Example(self.sizes, {n: a[keep] for n, a in self.inputs.items()}, self.cotangent[keep], tangents,
                       self.layout)


def _round_inward(bound: float, dtype: torch.dtype, upward: bool) -> float:
    """The nearest dtype-representable value at or inside ``bound``."""
    if math.isinf(bound):
        return bound
    as_dtype = float(torch.tensor(bound, dtype=dtype))
    if (as_dtype < bound) if upward else (as_dtype > bound):
        as_dtype = float(torch.nextafter(torch.tensor(as_dtype, dtype=dtype),
                                         torch.tensor(math.inf if upward else -math.inf, dtype=dtype)))
    return as_dtype


def _floats(domain: Domain, dtype: torch.dtype, magnitude: float) -> st.SearchStrategy:
    low = _round_inward(max(domain.low, -magnitude), dtype, upward=True)
    high = _round_inward(min(domain.high, magnitude), dtype, upward=False)
    if low > high:
        beyond = max(abs(domain.low), abs(domain.high)) > magnitude and domain.low <= domain.high
        raise SpecError(f"no {str(dtype)[6:]} value lies in the domain {domain}" + (
            f" up to {magnitude:.3g}, the largest magnitude drawn (a headroom below the largest finite value)"
            if beyond else ""))
    floats = st.floats(low, high, exclude_min=domain.low_open and low == domain.low,
                       exclude_max=domain.high_open and high == domain.high,
                       allow_nan=False, allow_infinity=False, allow_subnormal=False, width=FLOAT_WIDTH[dtype])
    if dtype != torch.bfloat16:
        return floats
    # Hypothesis has no bfloat16: float32 values rounded to it (monotonic, so within bounds).
    return floats.map(lambda v: float(torch.tensor(v, dtype=torch.bfloat16))).filter(
        lambda v: not ((domain.low_open and v == domain.low) or (domain.high_open and v == domain.high)))


# Inputs stay this many times below the largest finite number (float16, with 30 binades in all,
# 16 times): a kernel's steps may double or square an input on the way to a representable
# result (torch's square backward forms 2 * x before the cotangent), and the checks are about
# the math, not about a kernel's headroom at the very edge of the range.
HEADROOM = {torch.float16: 2.0**4}
DEFAULT_HEADROOM = 2.0**10


def largest_drawn(dtype: torch.dtype) -> float:
    """The largest magnitude an input of ``dtype`` is drawn at."""
    return float(torch.finfo(dtype).max) / HEADROOM.get(dtype, DEFAULT_HEADROOM)


@functools.lru_cache(maxsize=256)
def values(domain: Domain, dtype: torch.dtype, wide: bool) -> st.SearchStrategy:
    """Floats inside ``domain``, exactly representable in ``dtype``: of ordinary magnitude, or
    (``wide``) anywhere up to near the largest finite value of the dtype.

    Raises ``SpecError`` when no value of the dtype lies inside the domain. Cached: a large
    input draws a few values from it per example, and building it anew costs more.
    """
    # Up to a few binades below overflow, and no subnormal number.
    anywhere = _floats(domain, dtype, largest_drawn(dtype)).filter(lambda v: v == 0 or abs(v) >= torch.finfo(dtype).tiny)
    if wide or domain.low >= ORDINARY_MAGNITUDE or domain.high <= -ORDINARY_MAGNITUDE:
        return anywhere
    return _floats(domain, dtype, ORDINARY_MAGNITUDE)


def size_bounds(spec: Spec) -> dict:
    """The usual range drawn for each size symbol: from the smallest size every single-symbol
    requirement (x[1:] needs n >= 2) allows, to the default cap or an op's smaller one.

    Raises ``SpecError`` for a requirement no size up to ``LARGE_SIZE`` meets."""
    return {name: (smallest, max(smallest, usual)) for name, (smallest, usual) in _size_ranges(spec).items()}


def _largest_size(spec: Spec) -> int:
    caps = [REGISTRY[n.op].max_size for n in graph_nodes(spec) if isinstance(n, Apply) and REGISTRY[n.op].max_size]
    return min([LARGE_SIZE, *caps])


def _size_ranges(spec: Spec) -> dict:
    """name -> (smallest, usual largest)."""
    largest = _largest_size(spec)
    usual = min(DEFAULT_SIZES[1], largest)
    ranges = {}
    for name, symbol in spec.size_symbols.items():
        own = [r for r in spec.size_requirements if r.free_symbols == {symbol}]
        smallest = next((v for v in range(DEFAULT_SIZES[0], largest + 1)
                         if all(r.xreplace({symbol: v}) >= 1 for r in own)), None)
        if smallest is None:
            needs = " and ".join(f"{r} >= 1" for r in own if not all(r.xreplace({symbol: v}) >= 1
                                                                      for v in range(1, largest + 1)))
            raise SpecError(f"no size {name} up to {largest} meets what the spec needs: {needs}")
        ranges[name] = (smallest, usual)
    return ranges


def _meets_requirements(spec: Spec, sizes: dict) -> bool:
    values = {symbol: sympy.Integer(sizes[name]) for name, symbol in spec.size_symbols.items()}
    return all(r.xreplace(values) >= 1 for r in spec.size_requirements if r.free_symbols)


def _large_candidates(spec: Spec, fixed) -> set:
    """The size symbols that may be drawn large: those not fixed, used by no input of rank 3 or more."""
    in_higher_ranks = {s.name for declared in spec.inputs.values() if len(declared.shape) > 2
                       for size in declared.shape if isinstance(size, sympy.Expr) for s in size.free_symbols}
    return set(spec.size_symbols) - in_higher_ranks - set(fixed)


def _elements_per_point(spec: Spec, sizes: dict) -> int:
    return sum(math.prod(concrete_shape(declared.shape, sizes)) for declared in spec.inputs.values())


def held_per_point(spec: Spec, sizes: dict) -> int:
    """The elements of all the spec's tensors at one point: what the reference and torch hold."""
    return sum(math.prod(concrete_shape(node.shape, sizes)) for node in graph_nodes(spec))


def _within_memory(spec: Spec, chosen: dict, fixed) -> dict:
    """``chosen`` with the largest drawn sizes halved until a point holds at most
    ``MAX_POINT_ELEMENTS``, or none can be (``check_given_sizes`` makes sure the smallest fit)."""
    bounds = size_bounds(spec)
    while held_per_point(spec, chosen) > MAX_POINT_ELEMENTS:
        drawn = [name for name in chosen if name not in fixed and chosen[name] // 2 >= bounds[name][0]]
        if not drawn:
            break
        chosen[max(drawn, key=chosen.get)] //= 2
    return chosen


def check_given_sizes(spec: Spec, fixed: dict) -> None:
    """A ``SpecError`` where the sizes a caller fixed, with the others at their smallest, make a
    point hold more than ``MAX_POINT_ELEMENTS``."""
    smallest = {name: low for name, (low, _) in size_bounds(spec).items()}
    held = held_per_point(spec, {**smallest, **fixed})
    if held > MAX_POINT_ELEMENTS:
        shown = ", ".join(f"{name} = {value}" for name, value in fixed.items())
        raise SpecError(f"at {shown}, the spec's tensors hold {held} elements per point; at most "
                        f"{MAX_POINT_ELEMENTS} (2^23) are checked", path=spec.path)


def _draw_sizes(draw, spec: Spec, sizes, block_edges: bool = False) -> dict:
    chosen = dict(sizes or {})
    bounds = size_bounds(spec)
    candidates = _large_candidates(spec, chosen)
    # Shrinks to the usual sizes; drawn only where a symbol may be large, so that other
    # specs keep their draws.
    large = bool(candidates) and draw(st.integers(0, LARGE_ODDS), label="large sizes") == LARGE_ODDS
    largest = _largest_size(spec)
    for name, (smallest, usual) in bounds.items():
        if name not in chosen:
            if not (large and name in candidates):
                drawn = st.integers(smallest, usual)
            else:
                drawn = _block_edges(smallest, largest) if block_edges else st.integers(smallest, largest)
            chosen[name] = draw(drawn, label=f"size {name}")
    while large and _elements_per_point(spec, chosen) > LARGE_ELEMENTS:  # halve the largest to fit
        name = max(candidates, key=chosen.get)
        if chosen[name] // 2 < bounds[name][0]:
            break
        chosen[name] //= 2
    assume(_meets_requirements(spec, chosen))
    return _within_memory(spec, chosen, sizes or {})


def simplest_example(spec: Spec, dtype: torch.dtype, sizes: dict | None = None) -> Example:
    """One point before any drawing: the smallest sizes, and each input at its domain's
    simplest value (1 where the domain holds it), to try that user code can be called at all."""
    chosen = {**{name: low for name, (low, _) in size_bounds(spec).items()}, **(sizes or {})}
    inputs = {}
    for name, declared in spec.inputs.items():
        shape = (1, *concrete_shape(declared.shape, chosen))
        if declared.integer:
            value = declared.domain.bounds(chosen)[0]
        elif declared.domain.contains(1.0):
            value = 1.0
        else:
            low, high = max(declared.domain.low, -1e3), min(declared.domain.high, 1e3)
            value = _round_inward((low + high) / 2, dtype, upward=True)
        inputs[name] = np.full(shape, float(value))
    output_shape = concrete_shape(spec.nodes[spec.output].shape, chosen)
    return Example(chosen, inputs, np.ones((1, *output_shape)))


def _block_edges(smallest: int, largest: int) -> st.SearchStrategy:
    """Sizes from ``smallest`` to ``largest``, half of them a power of two or its neighbour: a
    kernel's masked last block (2^k + 1, 2^k - 1) and its exact fit (2^k) are different code."""
    edges = sorted({edge for k in range(largest.bit_length() + 1) for edge in (2**k - 1, 2**k, 2**k + 1)
                    if smallest <= edge <= largest})
    return st.one_of(st.sampled_from(edges), st.integers(smallest, largest)) if edges else st.integers(smallest, largest)


def _draw_input(draw, spec: Spec, name: str, dtype: torch.dtype, sizes: dict, batch: int,
                materialize: bool) -> np.ndarray:
    declared = spec.inputs[name]
    shape = (batch, *concrete_shape(declared.shape, sizes))
    if declared.integer:  # held as float64, exact: torch gets them as int64
        low, high = declared.domain.bounds(sizes)
        if materialize or math.prod(shape) > DRAWN_ELEMENTS:
            seed = draw(st.integers(0, 2**32 - 1), label=f"seed of {name}")
            return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.float64)
        return draw(hnp.arrays(np.float64, shape, elements=st.integers(low, high - 1).map(float)), label=name)
    # Per input and example, so that a whole tensor of ordinary values stays common.
    wide = draw(st.booleans(), label=f"{name} at any magnitude")
    if materialize or math.prod(shape) > DRAWN_ELEMENTS:
        return _materialized(draw, declared.domain, dtype, shape, wide, label=name)
    return draw(hnp.arrays(np.float64, shape, elements=values(declared.domain, dtype, wide)), label=name)


def _draw_directions(draw, shape: tuple, label: str, materialize: bool) -> np.ndarray:
    if materialize or math.prod(shape) > DRAWN_ELEMENTS:
        seed = draw(st.integers(0, 2**32 - 1), label=f"seed of {label}")
        return np.random.default_rng(seed).choice(DIRECTION_VALUES, size=shape)
    return draw(hnp.arrays(np.float64, shape, elements=DIRECTIONS), label=label)


def _materialized(draw, domain: Domain, dtype: torch.dtype, shape: tuple, wide: bool, label: str) -> np.ndarray:
    """A large array inside ``domain``: numpy fills it from a drawn seed, uniformly over the
    ordinary range scaled by a drawn power of 10 (wider with ``wide``), then Hypothesis places
    a few special values of its choosing (0, ties, the extremes of the dtype)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label=f"seed of {label}"))
    fallback = draw(values(domain, dtype, wide=False), label=f"fallback of {label}")
    widest = int(math.log10(largest_drawn(dtype)) / 2) if wide else 2
    # Where exp overflows (past 11, 88 and 709 in the half types, float32 and float64), a naive
    # kernel fails: half the wide scales reach those decades, the others the dtype's whole range.
    near = wide and draw(st.booleans(), label=f"{label} near the overflow thresholds")
    scale = 10.0 ** draw(st.integers(0, THRESHOLD_DECADES) if near else st.integers(-widest, widest),
                         label=f"scale of {label}")
    size = math.prod(shape)
    low, high = max(domain.low, -ORDINARY_MAGNITUDE * scale), min(domain.high, ORDINARY_MAGNITUDE * scale)
    if high < low:  # the domain lies beyond the scale: fill from its near end
        low, high = (domain.low, domain.low + ORDINARY_MAGNITUDE * scale) if domain.low > 0 else (
            domain.high - ORDINARY_MAGNITUDE * scale, domain.high)
    array = torch.tensor(rng.uniform(low, high, size), dtype=torch.float64).to(dtype).double().numpy()
    valid = np.isfinite(array) & ((array == 0) | (np.abs(array) >= torch.finfo(dtype).tiny))
    valid &= (array > domain.low) if domain.low_open else (array >= domain.low)
    valid &= (array < domain.high) if domain.high_open else (array <= domain.high)
    array = np.where(valid, array, fallback)
    count = draw(st.integers(0, MATERIALIZED_SPECIALS), label=f"special values of {label}")
    for _ in range(count):
        at = draw(st.integers(0, size - 1), label=f"position in {label}")
        array[at] = draw(values(domain, dtype, wide), label=f"value in {label}")
    return array.reshape(shape)


def points_per_example(spec: Spec, sizes: dict, budget: Budget = BATCHED) -> int:
    """As many points as the budget's input elements allow, and as fit in ``BATCH_ELEMENTS``
    of all the spec's tensors (an outer product holds far more than its inputs)."""
    per_point = _elements_per_point(spec, sizes)
    held = held_per_point(spec, sizes)
    return max(1, min(budget.points, budget.elements // max(per_point, 1), BATCH_ELEMENTS // max(held, 1)))


def _draw_points(draw, spec: Spec, dtype: torch.dtype, sizes: dict, batch: int, tangents: bool,
                 materialize: bool) -> Example:
    inputs = {name: _draw_input(draw, spec, name, dtype, sizes, batch, materialize) for name in spec.inputs}
    shape = (batch, *concrete_shape(spec.nodes[spec.output].shape, sizes))
    cotangent = _draw_directions(draw, shape, "cotangent", materialize)
    drawn = None
    if tangents:
        drawn = {name: _draw_directions(draw, array.shape, f"tangent of {name}", materialize)
                 if not spec.inputs[name].data else np.zeros(array.shape)  # data moves with no tangent
                 for name, array in inputs.items()}
    return Example(sizes, inputs, cotangent, drawn)


@st.composite
def examples(draw, spec: Spec, dtype: torch.dtype, sizes=None, tangents: bool = False,
             budget: Budget = BATCHED, layouts: bool = False) -> Example:
    """Sizes for the size symbols not fixed by ``sizes``, then a batch of points (as many as
    ``budget`` allows), a random cotangent for the output and (``tangents``) a random tangent
    for each input.

    The batch is a few points drawn element by element, and usually a bulk of many more that
    numpy materializes, up to the element budget. The shrinker can drop the bulk and keep
    the few: a failure that any point shows ends at one minimal point. With ``layouts`` (user
    code), one memory layout (``verify.layouts``) for the tensors it is handed, and large sizes
    drawn at block edges half the time.
    """
    chosen = _draw_sizes(draw, spec, sizes, block_edges=layouts)
    layout = draw(st.sampled_from(LAYOUTS), label="layout") if layouts else "contiguous"
    most = points_per_example(spec, chosen, budget)
    # Decided before the few are drawn: the shrinker tries dropping the bulk (this draw
    # shrinks to 0) while the few are still as found, before it simplifies them. Most
    # examples carry one, so that large inputs get many points per example.
    with_bulk = draw(st.integers(0, BULK_ODDS), label="a bulk of points") > 0
    head = _draw_points(draw, spec, dtype, chosen, draw(st.integers(1, min(MAX_BATCH, most)), label="points"),
                        tangents, materialize=False)
    if with_bulk and head.batch < most:
        head = head.joined(_draw_points(draw, spec, dtype, chosen, most - head.batch, tangents, materialize=True))
    if layout == "expanded" and head.cotangent.ndim > 1:  # a cotangent constant along its last axis
        head.cotangent[...] = head.cotangent[..., :1]
    return dataclasses.replace(head, layout=layout)


@st.composite
def inputs(draw, spec: str | Spec, dtype: torch.dtype = torch.float64, sizes: dict | None = None) -> dict:
    """Input tensors for ``spec``, for your own ``@given`` tests: a dict from input name (in
    declaration order) to a tensor of ``dtype``, with sizes drawn for the size symbols not
    fixed by ``sizes`` and values inside each input's domain, as ``verify.check`` draws them.

    >>> from hypothesis import given
    >>> @given(inputs("x: Positive[n]\\no = sum(log(x))", dtype=torch.float32))
    ... def test_log_is_finite(point):
    ...     assert torch.log(point["x"]).isfinite().all()
    >>> test_log_is_finite()
    """
    from .spec import parse

    parsed = parse(spec) if isinstance(spec, str) else spec
    if dtype not in FLOAT_WIDTH:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_WIDTH))}; got {dtype}")
    chosen = _draw_sizes(draw, parsed, sizes)
    return {name: torch.tensor(_draw_input(draw, parsed, name, dtype, chosen, 1, materialize=False)[0],
                               dtype=input_dtype(parsed, name, dtype))
            for name in parsed.inputs}


def input_dtype(spec: Spec, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype torch gets an input in: integers (indices, labels) as int64, reals in ``dtype``."""
    return torch.int64 if spec.inputs[name].integer else dtype
