"""Arithmetic for the exact pass: python-flint's ``arb`` balls, element by element.

A ball is a midpoint and a radius that rigorously contain the exact value, with arbitrary
precision and exponent range: ``exp(800)`` and ``exp(-800)`` are ordinary numbers here.
The reference's compiled formulas run on numpy object arrays of balls, so the same
closures serve float64 and the exact pass (``verify.reference``).

Comparisons are decided only when the balls tell: two balls that overlap, unless both are
exact and equal, raise ``Undecided``, and the caller raises the precision. A tie reached by
exact arithmetic from exact inputs (``x + 3`` at x = -3) is a tie, decided.
"""

from __future__ import annotations

import contextlib
import math

import flint
import numpy as np
import sympy
import torch
from flint import arb
from sympy.codegen import cfunctions

from .lower import functions

# Working precisions, in bits, tried in turn until every comparison is decided and every
# result is known far below a float64 ulp.
PRECISIONS = (128, 512, 2048)
# A result is precise enough when its radius is below this fraction of its magnitude, or
# below the smallest float64 subnormal's.
RELATIVE_RADIUS = 2.0**-64
ABSOLUTE_RADIUS = 2.0**-1100


class Undecided(Exception):
    """Two balls overlap: their order is not known at this precision."""


class Beyond(Exception):
    """A result beyond arb's exponent range (exp of 2**60 or more), which no precision reaches."""


# arb's exp gives no finite ball for arguments past about 2**63.
LARGEST_EXPONENT = 2.0**60


def _exponential(fn):
    """``fn`` of a ball whose size grows as exp of it: Beyond where that leaves arb's range."""
    def guarded(x):
        if abs(float(_ball(x).mid())) >= LARGEST_EXPONENT:
            raise Beyond(f"exp of {float(_ball(x).mid()):g}")
        return fn(x)

    return guarded


class _Mode:
    """How the formulas run on balls. Exactly, by default: a sign that a ball does not tell
    raises ``Undecided``. In ``modelled``, every step of a formula also widens its ball as
    the allowance's model rounds it (``verify.tolerance``): relatively by ``rounding`` times
    the step's ratio (inside a kernel or between kernels), and absolutely by its dtype's
    smallest subnormal number. That rounding is far below any dtype's, so ball arithmetic
    follows the first-order (linear) model of a computation's error: ``scale`` times the
    radius of a result is what a computation in the dtype may be off by. Signs are decided
    by midpoints, noting in ``straddled`` whether a rounding of the dtype could flip one."""

    def __init__(self):
        self.rounding = None  # a ball's radius: an exact power of 2, below float64's range if need be
        self.scale = 1.0
        self.linear = True  # the first-order model (else the dtype's own rounding, higher orders too)
        self.ratios = {False: 1.0, True: 1.0}  # a step's rounding between kernels and inside one
        self.stores = False  # whether each kernel's result is rounded once more, to the stored dtype
        # Inside a kernel or not, and "stored" -> (the smallest normal number of the dtype such a
        # step rounds in, what a step below it may be off by, as a radius)
        self.spacings = {}
        self.limits = {}  # the same keys -> the largest finite number of that dtype
        # A step of the spec's forward went beyond its dtype's range (the range is then taken as
        # unbounded); only noted while ``noting``: the derivatives' formulas are sympy's, whose
        # intermediate steps (1 / y**2 in div's) are not torch's ((x / y) / y).
        self.overflowed = False
        self.noting = True
        self.straddled = False
        # An exact tie (a sign that is exactly 0) is met: at a kink, as the formula says there,
        # or, with ``ties`` at 1 or -1, as if approached from that side.
        self.tied = False
        self.ties = 0


MODE = _Mode()


@contextlib.contextmanager
def exactly(ties: int = 0):
    """Run the block exactly, exact ties taken as ``ties`` says; yields the mode, to read ``tied``."""
    MODE.ties, MODE.tied = ties, False
    try:
        yield MODE
    finally:
        MODE.ties = 0


@contextlib.contextmanager
def ties_settled():
    """Comparisons that order elements (a sort, an argmax): an exact tie is settled by the
    order's own rule, so it is neither taken from a side nor noted as a kink."""
    saved = MODE.ties, MODE.tied
    MODE.ties = 0
    try:
        yield
    finally:
        MODE.ties, MODE.tied = saved


@contextlib.contextmanager
def modelled(model, largest: float, linear: bool = True, unbounded: bool = False):
    """Run the block in the modelled mode (above) for the precision ``model``
    (``verify.tolerance.Precision``), on inputs up to ``largest`` in magnitude; yields the mode,
    to read ``scale`` and ``straddled``. The rounding is small enough that it moves ``exp`` of
    the largest input by far less than 1, and the precision wide enough to carry it.
    ``unbounded``: a step of the point overflows the dtype, which the model does not follow
    (the exact result is what the code must give), so no step underflows either.

    Without ``linear``, the rounding is the dtype's own (``scale`` is 1): the balls then enclose
    every evaluation that rounds each step by up to its u, higher-order terms included.
    ``sinc(x)**2`` at a large integer x is exactly 0, and a float32 evaluation that rounds
    ``pi * x`` gets 1.8e-16 there, where the first-order model allows nothing."""
    from .tolerance import underflow_error, underflow_threshold

    bits = 64 + max(math.frexp(largest)[1], 0)
    previous = flint.ctx.prec
    flint.ctx.prec = max(previous, 2 * bits + 64)
    if linear:
        MODE.rounding, MODE.scale = arb(2) ** -bits, arb(model.u) * arb(2) ** bits
    else:
        MODE.rounding, MODE.scale = arb(model.u), arb(1)
    MODE.linear = linear
    MODE.ratios = {False: arb(model.outer_ratio), True: arb(model.kernel_ratio)}
    MODE.stores = model.stores_kernels
    outer = model.compute if model.fused else model.dtype
    steps = ((False, outer), (True, model.compute), ("stored", model.dtype))
    MODE.spacings = {key: (underflow_threshold(dtype), None if unbounded else arb(underflow_error(dtype)) / MODE.scale)
                     for key, dtype in steps}
    MODE.limits = {key: float(torch.finfo(dtype).max) for key, dtype in steps}
    MODE.overflowed = False
    MODE.straddled = False
    try:
        yield MODE
    finally:
        MODE.rounding, MODE.scale = None, 1.0
        flint.ctx.prec = previous


def _integral(values) -> bool:
    """Index and size arithmetic, which is exact."""
    return isinstance(values, (int, np.integer)) or isinstance(values, np.ndarray) and values.dtype.kind in "iub"


def rounded(values, roundings=1, inside: bool = False, ratio: float | None = None):
    """``values`` widened by ``roundings`` roundings of a step inside a kernel or between
    kernels (or of ``ratio`` times the rounding), and below the normal range of the dtype the
    step rounds in, by what underflow costs there, in the modelled mode."""
    if MODE.rounding is None or _integral(values) or np.all(np.equal(roundings, 0)):
        return values
    factor = arb(1, MODE.rounding * (MODE.ratios[inside] if ratio is None else arb(ratio)))
    return np.frompyfunc(lambda value, k: _underflowed(_ball(value) * factor ** int(k), inside), 2, 1)(
        values, roundings)


def op_rounded(values, roundings, inside: bool):
    """``values`` as a function of ``roundings`` roundings leaves them: a half type's op
    outside a kernel computes in float32 and stores its result once."""
    if MODE.stores and not inside and roundings:
        return stored(rounded(values, roundings, True))
    return rounded(values, roundings, inside)


def may_be_nonzero(values) -> np.ndarray:
    """Per element, whether a ball (or an exact number) may be nonzero: a term that is surely
    0 adds exactly."""
    def one(value):
        return not (value.is_zero() if isinstance(value, arb) else value == 0)

    return np.asarray(np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object)), dtype=bool)


def rounded_sum(total, terms: list, inside: bool = False, roundings=1):
    """A sum of ``terms`` widened by ``roundings`` roundings of the sum of their magnitudes
    (partial sums may reach it, in any order), and by what underflow costs, in the modelled
    mode."""
    if MODE.rounding is None or _integral(total):
        return total
    spread = MODE.rounding * MODE.ratios[inside]
    widened = total + sum(np.abs(t) for t in terms) * np.frompyfunc(lambda k: arb(0, spread * int(k)), 1, 1)(
        np.asarray(roundings))
    return np.frompyfunc(lambda value: _underflowed(_ball(value), inside), 1, 1)(widened)


def _underflowed(value, key):
    """``value`` widened by what a step of the dtype ``key`` names costs below its normal range;
    a step beyond that dtype's range is noted in ``MODE.overflowed``."""
    tiny, spread = MODE.spacings[key]
    if value.is_nan():
        return value
    magnitude = float(abs(value).mid())
    if MODE.noting and magnitude > MODE.limits[key]:
        MODE.overflowed = True
    if spread is None or magnitude >= tiny:
        return value
    return value + arb(0, spread)


def off_by(values, roundings: float, inside: bool, absolute: float, log_roundings: bool = False):
    """``values`` widened by a kernel's calibrated errors, in the modelled mode: ``roundings``
    of its result at the step's ratio (and |log|value|| more, with ``log_roundings``), and
    ``absolute`` (in units of the dtype's u)."""
    if MODE.rounding is None or _integral(values) or not (roundings or absolute or log_roundings):
        return values
    rounding = MODE.rounding * MODE.ratios[inside]
    spread = MODE.rounding * arb(absolute)  # u of the dtype is MODE.rounding times MODE.scale

    def one(value):
        value = _ball(value)
        if value.is_nan():
            return value
        count = arb(roundings)
        if log_roundings:
            count = count + abs(arb(max(abs(float(value.mid())), 1e-300)).log())
        return value + abs(value) * arb(0, rounding * count) + arb(0, spread)

    return np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object))


def flushed(values, inside: bool):
    """``values`` of a step whose kernel returns 0 below the normal range of the dtype it rounds
    in, widened there by that range's bottom, in the modelled mode."""
    if MODE.rounding is None or _integral(values):
        return values
    tiny = MODE.spacings[inside][0]

    def one(value):
        value = _ball(value)
        if value.is_nan() or float(abs(value).mid()) >= tiny:
            return value
        return value + arb(0, arb(tiny) / MODE.scale)

    return np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object))


def stored(values):
    """A kernel's result, rounded once more to the stored dtype where each op stores its own
    (an exact result, as a max or a copy, stays exact)."""
    if MODE.rounding is None or not MODE.stores or _integral(values):
        return values
    return np.frompyfunc(_stored, 1, 1)(np.asarray(values, dtype=object))


def _stored(value):
    value = _ball(value)
    if value.is_exact() or value.is_nan():
        return value
    return _underflowed(value * arb(1, MODE.rounding), "stored")


@contextlib.contextmanager
def forward_steps_noted(noted: bool):
    """Note overflowing steps (``MODE.overflowed``) in the block, or not."""
    saved, MODE.noting = MODE.noting, noted
    try:
        yield
    finally:
        MODE.noting = saved


@contextlib.contextmanager
def precision(bits: int):
    previous = flint.ctx.prec
    flint.ctx.prec = bits
    try:
        yield
    finally:
        flint.ctx.prec = previous


def _ufunc(fn, arity: int = 1):
    """``fn`` on balls, element by element over arrays; the result is an object array or a ball."""
    elementwise = np.frompyfunc(fn, arity, 1)

    def on_balls(*args):
        # numpy reports the float flags raised inside the loop; on balls they mean nothing.
        with np.errstate(all="ignore"):
            return elementwise(*(to_balls(a) for a in args))

    return on_balls


def _polygamma(order, x):
    order = int(order.unique_fmpz())
    if order == 0:
        return x.digamma()
    return (-1) ** (order + 1) * math.factorial(order) * arb.zeta(arb(order + 1), x)


def _sign(x):
    return _decided_sign(x)


def _step(kind: str):
    """A rounding to integers on a ball: the side of the jump nearest it is decided like a
    sign (an exact tie is the value at the jump)."""
    def step(x):
        x = _ball(x)
        if x.is_nan():
            raise Undecided("an undefined value")
        middle = x.mid()
        if kind == "round":  # jumps at half-integers
            below = int(middle.floor().unique_fmpz())
            side = _decided_sign(x - below - arb(0.5))
            if side == 0:
                return below if below % 2 == 0 else below + 1
            return below + (side > 0)
        below = int(middle.floor().unique_fmpz())
        jump = below + 1 if middle - below >= arb(0.5) else below  # the nearest integer
        side = _decided_sign(x - jump)
        if side == 0 or kind == "trunc" and jump == 0:  # trunc has no jump at 0
            return jump
        if kind == "floor" or kind == "trunc" and jump > 0:
            return jump if side > 0 else jump - 1
        return jump + 1 if side > 0 else jump

    return np.frompyfunc(step, 1, 1)


FUNCTIONS = {
    functions.round_half_even: _step("round"), functions.floor_real: _step("floor"),
    functions.ceil_real: _step("ceil"), functions.trunc_real: _step("trunc"),
    sympy.exp: _ufunc(_exponential(arb.exp)), sympy.log: _ufunc(arb.log), sympy.sin: _ufunc(arb.sin), sympy.cos: _ufunc(arb.cos),
    sympy.tan: _ufunc(arb.tan), sympy.asin: _ufunc(arb.asin), sympy.acos: _ufunc(arb.acos),
    sympy.atan: _ufunc(arb.atan), sympy.sinh: _ufunc(_exponential(arb.sinh)),
    sympy.cosh: _ufunc(_exponential(arb.cosh)),
    sympy.tanh: _ufunc(arb.tanh), sympy.asinh: _ufunc(arb.asinh), sympy.acosh: _ufunc(arb.acosh),
    sympy.atanh: _ufunc(arb.atanh), sympy.Abs: _ufunc(abs), sympy.sign: _ufunc(_sign),
    sympy.atan2: _ufunc(arb.atan2, 2), sympy.sinc: _ufunc(arb.sinc),
    cfunctions.expm1: _ufunc(_exponential(arb.expm1)), functions.expm1: _ufunc(_exponential(arb.expm1)),
    cfunctions.log1p: _ufunc(arb.log1p),
    cfunctions.log2: _ufunc(lambda x: x.log() / arb.const_log2()),
    cfunctions.log10: _ufunc(lambda x: x.log() / arb.const_log10()),
    sympy.erf: _ufunc(arb.erf), sympy.erfc: _ufunc(arb.erfc), sympy.loggamma: _ufunc(arb.lgamma),
    sympy.polygamma: _ufunc(_polygamma, 2),
    # Past arb's range, each of these is its limit to far below a float64 ulp.
    functions.sigmoid: _ufunc(lambda x: _limit(x, 1, 0, lambda: 1 / (1 + (-x).exp()))),
    functions.logsigmoid: _ufunc(lambda x: _limit(x, 0, x, lambda: -((-x).exp().log1p()))),
    functions.softplus: _ufunc(lambda x: _limit(x, x, 0, lambda: x.exp().log1p())),
    functions.power: lambda a, b: power(a, b),
}


def _limit(x, above, below, exact):
    """``exact()``, or where ``x`` is past arb's exponent range, the value it tends to there
    (``above`` for large positive x, ``below`` for large negative), exact to far below an ulp."""
    middle = float(_ball(x).mid())
    if abs(middle) < LARGEST_EXPONENT:
        return exact()
    return _ball(above if middle > 0 else below)


def to_balls(values):
    """Floats (exact), ints and balls as balls; arrays elementwise, into an object array."""
    if isinstance(values, np.ndarray):
        return np.asarray(np.frompyfunc(_ball, 1, 1)(values.astype(object)), dtype=object)
    return _ball(values)


# What a non-integer index is taken as: a branch not taken (a Piecewise evaluates every
# branch; reshape's VJP indexes by (i - k) / c, an integer only where its condition holds). A
# gather clips it, and no index equals it.
NOT_AN_INTEGER = -(2**62)
# Indices are rationals whose denominators are products of sizes (below 2**40 elements): one
# that is not an integer is at least this far from every integer.
INTEGER_GAP = 2.0**-40


def to_integers(values) -> np.ndarray:
    """Integers as Python ints in an object array: exact ones (float64, or a drawn integer
    input), or balls of an index. A ball within ``INTEGER_GAP`` of one integer is it; a ball
    that holds no integer is ``NOT_AN_INTEGER``. Exactly, a ball that holds several raises
    ``Undecided`` (more precision decides); in the modelled mode the midpoint decides, and a
    rounding of the dtype that could move it to another integer is noted as ``straddled``."""
    def one(value):
        if not isinstance(value, arb):
            return int(value) if float(value).is_integer() else NOT_AN_INTEGER
        if MODE.rounding is not None:
            MODE.straddled |= bool(value.rad() * MODE.scale >= 0.5)
            value = value.mid()
        integer = (value.mid() + arb(0.5)).floor().unique_fmpz()
        if integer is not None and abs(value - arb(integer)).upper() < INTEGER_GAP:
            return int(integer)
        below, above = value.lower().floor().unique_fmpz(), value.upper().floor().unique_fmpz()
        if below is not None and below == above and arb(below) < value.lower():
            return NOT_AN_INTEGER  # strictly between two integers
        raise Undecided(f"which integer the index {value} is")

    return np.asarray(np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object)), dtype=object)


def _ball(value):
    if isinstance(value, arb):
        return value
    if isinstance(value, (bool, np.bool_)):
        return arb(int(value))
    if isinstance(value, (int, np.integer)):
        return arb(int(value))
    return arb(float(value))


def constant(expr):
    """A sympy number as a ball at the current precision (an integer stays an int: indices use it)."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Rational:
        return arb(flint.fmpq(int(expr.p), int(expr.q)))
    if expr is sympy.pi:
        return arb.pi()
    if expr is sympy.E:
        return arb(1).exp()
    if expr.is_Float:
        return arb(float(expr))
    raise ValueError(f"no ball for the number {expr}")


def power(base, exponent):
    """``base ** exponent``, with an integer exponent kept integral (a negative base stays defined)."""
    def one(b, p):
        if isinstance(p, arb) and (p.is_exact() or _ball(b) < 0) and p.mid().is_integer():
            # An integer exponent (of a negative base, whatever its ball) stays integral.
            p = int(p.mid().unique_fmpz())
        if isinstance(p, (int, np.integer)):
            return _integer_power(_ball(b), int(p))
        return _ball(b) ** _ball(p)

    return np.frompyfunc(one, 2, 1)(base, exponent)


def _integer_power(base, exponent: int):
    """``base ** exponent`` by squaring: arb's own power of a ball that holds 0 is nan."""
    if exponent < 0:
        return 1 / _integer_power(base, -exponent)
    result, square = arb(1), base
    while exponent:
        if exponent & 1:
            result = result * square
        exponent >>= 1
        if exponent:
            square = square * square
    return result


def _decided_sign(x) -> int:
    """-1, 0 or 1: the sign of ``x``, which must be known (else ``Undecided``)."""
    if not isinstance(x, arb):
        return (x > 0) - (x < 0)
    if x.is_nan():
        raise Undecided("an undefined value")
    if x.is_zero():
        MODE.tied = True
        return MODE.ties
    if MODE.rounding is not None:
        middle = x.mid()
        if middle.is_zero():  # a tie at the exact point: a rounding of the inputs moves both sides
            return 0
        MODE.straddled |= bool(abs(middle) <= x.rad() * MODE.scale)
        return 1 if middle > 0 else -1
    if x > 0:
        return 1
    if x < 0:
        return -1
    raise Undecided(f"the sign of {x}")


_sign_of = np.frompyfunc(_decided_sign, 1, 1)
COMPARE = {
    sympy.Lt: lambda s: s < 0, sympy.Le: lambda s: s <= 0, sympy.Gt: lambda s: s > 0,
    sympy.Ge: lambda s: s >= 0, sympy.Eq: lambda s: s == 0, sympy.Ne: lambda s: s != 0,
}


def compare(relation, left, right) -> np.ndarray:
    """``left relation right``, decided for every element (else ``Undecided``)."""
    signs = np.asarray(_sign_of(np.subtract(left, right, dtype=object)), dtype=np.int64)
    return COMPARE[relation](signs)


def heaviside(value, at_zero: float) -> np.ndarray:
    signs = np.asarray(_sign_of(value), dtype=np.int64)
    return np.where(signs > 0, 1, np.where(signs < 0, 0, to_balls(at_zero))).astype(object)


_larger = np.frompyfunc(lambda a, b: arb.max(_ball(a), _ball(b)), 2, 1)
_smaller = np.frompyfunc(lambda a, b: arb.min(_ball(a), _ball(b)), 2, 1)


def extremum(largest: bool):
    """A function reducing arrays of balls to the ball of their maximum (minimum), axis by axis."""
    pick = _larger if largest else _smaller

    def reduce(values, axis):
        for a in sorted(axis if isinstance(axis, tuple) else (axis,), reverse=True):
            values = pick.reduce(values, axis=a)
        return values

    return reduce


def neutral(largest: bool):
    return arb.neg_inf() if largest else arb.pos_inf()


def radius(values, scale) -> np.ndarray:
    """Each ball's radius times ``scale``, as float64 (inf where it is not finite)."""
    def one(ball):
        if not isinstance(ball, arb):
            return 0.0
        if ball.is_nan() or not ball.is_finite():
            return math.inf
        return float(ball.rad() * scale)

    return np.asarray(np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object)), dtype=np.float64)


def settled(arrays) -> bool:
    """Whether every ball of ``arrays`` is known far below a float64 ulp (or is undefined,
    which no precision changes)."""
    def one(ball):
        if not isinstance(ball, arb) or ball.is_exact() or ball.is_nan() or not ball.is_finite():
            return True
        radius = float(ball.rad())
        return radius <= ABSOLUTE_RADIUS or radius <= RELATIVE_RADIUS * abs(float(ball.mid()))

    check = np.frompyfunc(one, 1, 1)
    return all(bool(np.all(check(np.asarray(array, dtype=object)).astype(bool))) for array in arrays)


def midpoints(values):
    """Each ball's midpoint, an exact ball: a shift that cancels from its formula
    (``functions.shifted``) needs no radius, only to be one number."""
    return np.frompyfunc(lambda value: value.mid() if isinstance(value, arb) else value, 1, 1)(values)


def to_float(values) -> np.ndarray:
    """Balls as float64 midpoints: NaN where undefined, ±inf beyond float64's range, and the
    sign kept below it (the smallest subnormal, not 0, for a midpoint too small)."""
    def one(ball):
        if not isinstance(ball, arb):
            return float(ball)
        if ball.is_nan() or not ball.is_finite():
            return math.nan
        middle = float(ball.mid())
        if middle == 0 and not ball.mid().is_zero():
            return 5e-324 if ball.mid() > 0 else -5e-324
        return middle

    return np.asarray(np.frompyfunc(one, 1, 1)(values), dtype=np.float64)


def gaps(values) -> np.ndarray:
    """Per ball, how far its exact value may be from its float64 midpoint (``to_float``): 0
    where the ball is exactly that float, else one float64 spacing there."""
    def one(ball):
        if not isinstance(ball, arb):
            return 0.0
        middle = float(ball.mid())
        if ball.is_exact() and math.isfinite(middle) and arb(middle) == ball:
            return 0.0
        return float(np.spacing(abs(middle))) if math.isfinite(middle) else math.inf

    return np.asarray(np.frompyfunc(one, 1, 1)(np.asarray(values, dtype=object)), dtype=np.float64)
