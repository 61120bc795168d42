"""The options of a run, defined once for both fronts that read them from users.

Each option has one name. The CLI takes it as ``--max-examples``; the pytest plugin as
``--verify-max-examples`` on the command line or ``verify_max_examples`` in the ini file,
the command line winning. Values are parsed from text by the same functions in both.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

DTYPES = ("float64", "float32", "bfloat16", "float16")
MODES = ("rev", "fwd")
DEFAULT_DATABASE = ".verify/examples"
NO_DATABASE = ("none", "off", "")


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(f"must be at least 1; got {number}")
    return number


def _seconds(text: str) -> float:
    seconds = float(text)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a positive number of seconds; got {text!r}")
    return seconds


def words(text: str) -> list:
    """The names of a comma- or space-separated list."""
    return [w for w in re.split(r"[,\s]+", str(text)) if w]


def _dtypes(text: str) -> tuple:
    names = tuple(words(text))
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        raise ValueError(f"takes dtypes from {', '.join(DTYPES)}, separated by commas; got {text!r}")
    return names


def _order(text: str) -> int:
    if str(text).strip() not in ("1", "2"):
        raise ValueError(f"takes 1 or 2; got {text!r}")
    return int(text)


def _modes(text: str) -> tuple:
    modes = tuple(words(text))
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"takes rev, fwd or rev,fwd; got {text!r}")
    return modes


def _sizes(text: str) -> dict:
    sizes = {}
    for word in words(text):
        name, equals, value = word.partition("=")
        if not equals or not name.isidentifier() or not value.isdigit() or int(value) < 1:
            raise ValueError(f"takes size symbols with positive values, as n=1000,m=3; got {text!r}")
        sizes[name] = int(value)
    return sizes


def _database(text: str) -> str | None:
    return None if str(text).strip().lower() in NO_DATABASE else str(text)


def _switch(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(f"takes true or false; got {text!r}")
    return str(text).strip().lower() in ("true", "1", "yes", "on")


@dataclass(frozen=True)
class Option:
    name: str  # the field of RunSettings
    parse: Callable[[str], object]
    help: str
    switch: bool = False  # a flag with no value on the command line

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    Option("max_examples", _positive, "Hypothesis examples per spec and dtype, each a batch of points (default 100)"),
    Option("dtypes", _dtypes, "dtypes torch computes in, comma-separated: float64, float32, bfloat16, float16 "
                              "(default float64); each spec is checked in each"),
    Option("seed", int, "seed of the random inputs, for a run that repeats exactly"),
    Option("derandomize", _switch, "derive the seed from the spec text, so that CI runs repeat exactly", switch=True),
    Option("database", _database, f"directory where failing examples are kept and replayed first on the next run "
                                  f"(default {DEFAULT_DATABASE}; 'none' keeps none)"),
    Option("order", _order, "2 also checks Hessian-vector products: double backward, forward over reverse"),
    Option("modes", _modes, "comma-separated: rev (VJPs), fwd (JVPs); default rev,fwd"),
    Option("sizes", _sizes, "fix size symbols, as n=1000,m=3; the others are drawn (1 to 8, now and then up to 64)"),
    Option("time_budget", _seconds, "seconds per spec and dtype, planning included, after which no new example "
                                    "is drawn (a failure found is still shrunk); the report says how many ran"),
    Option("require_power", _switch, "fail a check whose judged elements are mostly weak (the allowance at least "
                                     "the exact value), rejected or left unjudged, instead of warning", switch=True),
)


@dataclass(frozen=True)
class RunSettings:
    max_examples: int = 100
    dtypes: tuple = ("float64",)
    seed: int | None = None
    derandomize: bool = False
    database: str | None = DEFAULT_DATABASE
    order: int = 1
    modes: tuple = MODES
    sizes: dict = field(default_factory=dict)
    time_budget: float | None = None
    require_power: bool = False

    def check_arguments(self, dtype: str) -> dict:
        """Keyword arguments of ``verify.check`` for one of the dtypes."""
        import torch

        return {"max_examples": self.max_examples, "seed": self.seed, "derandomize": self.derandomize,
                "database": self.database, "dtype": getattr(torch, dtype), "order": self.order, "modes": self.modes,
                "sizes": self.sizes, "time_budget": self.time_budget, "require_power": self.require_power}


def stable_seed(text: str, dtype_name: str) -> int:
    """A seed that depends only on the spec text and the dtype: the same in every CI run."""
    return zlib.crc32(f"{dtype_name}\n{text}".encode())


# -- the CLI --------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """Add every option to an ``argparse`` parser."""
    import argparse

    def parsing(option):
        def parse(text):
            try:
                return option.parse(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(f"{option.flag} {error}") from None
        return parse

    for option in OPTIONS:
        names = [option.flag] + (["--dtype"] if option.name == "dtypes" else [])
        if option.switch:
            parser.add_argument(*names, dest=option.name, action="store_true", default=argparse.SUPPRESS,
                                help=option.help)
        else:
            parser.add_argument(*names, dest=option.name, type=parsing(option), default=argparse.SUPPRESS,
                                metavar=option.name.upper(), help=option.help)


def from_arguments(arguments) -> RunSettings:
    given = {o.name: getattr(arguments, o.name) for o in OPTIONS if hasattr(arguments, o.name)}  # absent: not given
    return RunSettings(**given)


# -- the pytest plugin -------------------------------------------------------------------------
def add_pytest_options(parser) -> None:
    """Add every option to pytest: ``--verify-NAME`` and the ini value ``verify_NAME``."""
    group = parser.getgroup("verify")
    for option in OPTIONS:
        parser.addini(f"verify_{option.name}", option.help, default=None)
        flag = "--verify-" + option.flag[2:]
        if option.switch:
            group.addoption(flag, dest=f"verify_{option.name}", action="store_true", default=None, help=option.help)
        else:
            group.addoption(flag, dest=f"verify_{option.name}", default=None, help=option.help)


def ini_text(config, name: str) -> str:
    """An ini value as text, without an inline comment: pytest keeps ``false  # why`` whole."""
    return re.sub(r"(^|\s)#.*$", "", config.getini(name) or "", flags=re.M).strip()


def ini_switch(config, name: str) -> bool:
    """An ini value that is true or false (false where not given); another raises
    ``ValueError`` naming the option."""
    text = ini_text(config, name)
    try:
        return bool(text) and _switch(text)
    except ValueError as error:
        raise ValueError(f"{name} {error}") from None


def from_pytest(config) -> RunSettings:
    """The settings of a pytest run; a bad value raises ``ValueError`` naming the option."""
    given = {}
    for option in OPTIONS:
        raw = config.getoption(f"verify_{option.name}")
        if raw is None:
            raw = ini_text(config, f"verify_{option.name}")
        if raw in (None, ""):
            continue
        try:
            given[option.name] = option.parse(raw)
        except ValueError as error:
            raise ValueError(f"verify_{option.name} {error}") from None
    return RunSettings(**given)
