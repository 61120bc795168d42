"""Results and failure reports.

A failure report keeps the shape people know from ``torch.testing.assert_close``
(mismatched elements, greatest differences, what was allowed) and adds what only this
tool knows: the check, the node to blame, the symbolic formula, the input point and a
line that reproduces it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sympy

from .binding import COTANGENT_PREFIX
from .layouts import view_code
from .lower.functions import unmarked
from .lower.sympy import ADJOINT_PREFIX, COTANGENT, TANGENT_PREFIX

CHECKED = "checked numerically, not proved"
REFUTED = "false"
UNTESTED = "not checked: no point was accepted"


def proved(size_symbols) -> str:
    """The status of a claim sympy proved, naming the sizes it holds for."""
    return f"proved for all {', '.join(size_symbols)}" if size_symbols else "proved"


@dataclass
class ClaimResult:
    text: str  # as written after `assert`
    line: int
    status: str = UNTESTED
    unproved: str | None = None  # why sympy did not prove it; None where it did

    @property
    def proved(self) -> bool:
        return self.unproved is None


@dataclass
class Result:
    """The verdict on one spec: what was checked, what was rejected and why, each claim's status."""

    name: str
    dtype: str
    seed: int
    points: int = 0
    examples: int = 0
    rejected: dict = field(default_factory=dict)  # reason -> number of points
    exact: Counter = field(default_factory=Counter)  # what the exact pass did -> number of points
    # check -> [its weak elements, its elements judged]: weak where the allowance is at least
    # the exact value, so that a zero would pass there too
    weak: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)
    modes: tuple = ("rev", "fwd")
    order: int = 1
    unsupported: dict = field(default_factory=dict)  # mode or "dtype" -> why it could not be checked
    unavailable: dict = field(default_factory=dict)  # optional ways (fwd-over-rev) torch lacks here
    reproduce: str = ""  # a line that runs the same check again
    calls: dict = field(default_factory=dict)  # for a user's function: what -> how it was called
    budget_spent: float | None = None  # the time budget (seconds) that ended the drawing of examples

    @property
    def checks(self) -> str:
        """What was compared at each point, e.g. "values, VJPs, JVPs, HVPs"."""
        done = ["values"]
        if "rev" in self.modes and "rev" not in self.unsupported:
            done.append("VJPs")
        if "fwd" in self.modes and "fwd" not in self.unsupported:
            done.append("JVPs")
        if self.order == 2:
            done.append("HVPs")
        return ", ".join(done)

    @property
    def rejected_points(self) -> int:
        return sum(self.rejected.values())

    @property
    def unjudged_points(self) -> int:
        """Points the exact pass left unjudged: its budget, arb's range, an undecidable point."""
        return sum(count for what, count in self.exact.items() if what.startswith(("left unjudged", "inconclusive")))

    @property
    def inconclusive(self) -> int:
        """Points where float64 was sure of a disagreement the exact pass could not decide."""
        return sum(count for what, count in self.exact.items() if what.startswith("inconclusive"))

    def weakly_covered(self) -> list:
        """The checks most of whose elements were not judged with power, as lines: weak (a zero
        would pass there too), or at points rejected or left unjudged, counted together (a
        point's elements are taken as its check's average). A pass there says little."""
        lost = self.rejected_points + self.unjudged_points
        drawn = lost + self.points
        lines = []
        if lost > self.points and not self.weak:
            lines.append(f"most drawn points were rejected or left unjudged ({lost} of {drawn})")
        for check, (weak, judged) in sorted(self.weak.items()):
            strong = (judged - weak) / judged * self.points / drawn if judged and drawn else 0.0
            if strong < 0.5:
                lines.append(f"{check}: {1 - strong:.0%} of its elements were weak, rejected or unjudged ({weak} of "
                             f"{judged} judged elements weak, where the allowance is at least the exact value; "
                             f"{lost} of {drawn} points rejected or unjudged)")
        return lines

    @property
    def warnings(self) -> list:
        """What a reader of a pass should know: the checks cover less than the counts suggest."""
        return [f"{line}: the checks cover less of the input space than the point count suggests"
                for line in self.weakly_covered()]

    def details(self) -> list:
        """The lines under a verdict: rejections by reason, the exact pass's work, weak
        elements, warnings."""
        lines = [f"rejected {count} point(s): {reason}" for reason, count in sorted(self.rejected.items())]
        lines += [f"{what}: {count} point(s)" for what, count in sorted(self.exact.items())]
        lines += [f"weak {weak} of {judged} element(s) of {check}: the allowance is at least the exact value"
                  for check, (weak, judged) in sorted(self.weak.items()) if weak]
        lines += [f"calls for {what}: {how}" for what, how in self.calls.items()]
        return lines + [f"warning: {warning}" for warning in self.warnings]

    def summary(self) -> str:
        parts = [f"{self.points} points agree ({self.dtype}; {self.checks})"]
        if self.budget_spent is not None:
            parts.append(f"{self.examples} example(s), as many as the time budget of {self.budget_spent:g} s allowed")
        if self.rejected:
            parts.append(f"{self.rejected_points} rejected")
        for claim in self.claims:
            parts.append(f"claim `{claim.text}`: {claim.status}")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"{self.name}: ok, {self.summary()}"]
        lines += [f"  {line}" for line in self.details()]
        for way, reason in sorted(self.unavailable.items()):
            lines.append(f"  not available, so not checked: {way}: {reason}")
        return "\n".join(lines)


@dataclass
class Failure:
    """One disagreement, at the first failing point of the (shrunk) example."""

    check: str  # "value", "gradient" or "claim"
    subject: str  # what was compared, e.g. "∂o/∂x"
    formula: str
    inputs: dict  # input name -> values at the failing point
    sizes: dict
    reference: np.ndarray  # at the failing point
    actual: np.ndarray
    allowed: np.ndarray
    line: int | None = None  # the spec line of the node or claim
    reference_label: str = "reference"
    actual_label: str = "autograd"
    blame: str = ""
    claim: str = ""
    notes: list = field(default_factory=list)
    error: str = ""  # the code under test raised, or returned the wrong shape: no numbers to compare
    snippet: str = ""  # Python that reproduces the failing call of a user's function
    point: object = None  # the failing point as a one-point strategies.Example, to evaluate again

    def render(self, spec_name: str, reproduce: str) -> str:
        if self.error:
            lines = [f"{spec_name}: {self.check} check failed: {self.error}"]
            lines.append("  sizes:      " + (", ".join(f"{k} = {v}" for k, v in self.sizes.items()) or "none"))
            lines.extend(f"  input:      {name} = {_show(value)}" for name, value in self.inputs.items())
            lines.extend(f"  note:       {note}" for note in self.notes)
            return "\n".join(lines + self._reproduction(reproduce))
        reference = np.asarray(self.reference, dtype=np.float64)
        actual = np.asarray(self.actual, dtype=np.float64)
        difference = np.abs(actual - reference)
        # NaN counts as a mismatch, and so does a value that is not finite where the reference is.
        bad = ~(difference <= self.allowed) | (~np.isfinite(actual) & np.isfinite(reference))
        flat = np.where(bad.ravel(), np.nan_to_num(difference.ravel(), nan=np.inf), -1.0)
        worst = int(np.argmax(flat)) if flat.size else 0
        worst_index = np.unravel_index(worst, reference.shape) if reference.shape else ()
        relative = difference / np.maximum(np.abs(reference), np.finfo(np.float64).tiny)
        where = f"{spec_name}:{self.line}" if self.line else spec_name
        lines = [f"{where}: {self.check} check failed for {self.subject}"]
        if self.claim:
            lines.append(f"  claim:      {self.claim}")
        lines.append(f"  symbolic:   {self.formula}")
        if self.blame:
            lines.append(f"  blame:      {self.blame}")
        lines.append("  sizes:      " + (", ".join(f"{k} = {v}" for k, v in self.sizes.items()) or "none"))
        for name, value in self.inputs.items():
            lines.append(f"  input:      {name} = {_show(value)}")
        lines.append(f"  {self.reference_label + ':':<12}{_show(reference)}")
        lines.append(f"  {self.actual_label + ':':<12}{_show(actual)}")
        count = int(bad.sum())
        lines.append(f"  Mismatched elements: {count} / {bad.size} ({100.0 * count / max(bad.size, 1):.1f}%)")
        at = tuple(int(i) for i in worst_index)
        lines.append(f"  Greatest absolute difference: {_number(difference[at])} at index {at} "
                     f"(up to {float(np.asarray(self.allowed)[at] if np.ndim(self.allowed) else self.allowed):.3g} allowed)")
        if reference[at] == 0:  # no relative difference from 0: torch's assert_close would print inf
            lines.append(f"  Greatest relative difference: — at index {at} (reference 0)")
        else:
            lines.append(f"  Greatest relative difference: {_number(relative[at])} at index {at}")
        lines.extend(f"  note:       {note}" for note in self.notes)
        return "\n".join(lines + self._reproduction(reproduce))

    def _reproduction(self, reproduce: str) -> list:
        lines = [f"  reproduce:  {reproduce}"]
        if self.snippet:
            lines.append("  or call it directly:")
            lines.extend("    " + line for line in self.snippet.splitlines())
        return lines


def reproduction_snippet(fn_name: str, check: str, inputs: dict, cotangent, tangents: dict, dtype_name: str,
                         fixed: dict | None = None, layout: str = "contiguous") -> str:
    """Python that calls the user's function at the failing point, as the failed check did.
    ``fixed`` names the inputs that are not differentiated (labels, masks), each with its
    dtype's name (int64 for integers); ``layout`` is the memory layout they were handed in."""
    fixed = fixed or {}

    def tensor(array, grad=False, dtype=dtype_name):
        listed = np.asarray(array, dtype=np.int64 if dtype == "int64" else np.float64).tolist()
        return f"torch.tensor({listed!r}, dtype=torch.{dtype}" + (", requires_grad=True)" if grad else ")")

    named = re.fullmatch(r"[A-Za-z_][\w.]*", fn_name) is not None
    body = _snippet_body("fn" if not named else fn_name, check, inputs, cotangent, tangents, fixed, layout, tensor)
    if named:
        return "\n".join(["import torch", *body])
    # A lambda or a local function has no name to call it by: the snippet takes it.
    return "\n".join(["import torch", "", f"def reproduce(fn):  # fn: the {fn_name} passed to check_function",
                      *("    " + line for line in body)])


def _snippet_body(fn_name: str, check: str, inputs: dict, cotangent, tangents: dict, fixed: dict, layout: str,
                  tensor) -> list:
    names = ", ".join(inputs)
    moving = [name for name in inputs if name not in fixed]
    wrt = ", ".join(moving)
    lines = []
    if check == "JVP":
        lines.append("import torch.autograd.forward_ad as fwAD")
        lines.append("with fwAD.dual_level():")
        for n, value in inputs.items():
            made = tensor(value, dtype=fixed[n]) if n in fixed else \
                f"fwAD.make_dual({tensor(value)}, {tensor(tangents[n])})"
            lines.append(f"    {n} = {made}")
            code = view_code(layout, n, np.shape(value))
            if code:
                lines.append(f"    {n} = {code}  # the layout it was handed in")
        lines.append(f"    print(fwAD.unpack_dual({fn_name}({names})).tangent)")
        return lines
    lines.extend(f"{name} = {tensor(value, dtype=fixed[name]) if name in fixed else tensor(value, grad=True)}"
                 for name, value in inputs.items())
    viewed = {name: view_code(layout, name, np.shape(value)) for name, value in inputs.items()}
    lines.extend(f"{name}_laid_out = {code}  # the layout it was handed in" for name, code in viewed.items() if code)
    names = ", ".join(f"{name}_laid_out" if viewed[name] else name for name in inputs)
    lines.append(f"out = {fn_name}({names})")
    if check == "value":
        lines.append("print(out)")
    elif check == "HVP":
        # An input the output does not use has no gradient (None): it adds nothing to the HVP.
        lines.append(f"grads = torch.autograd.grad(out, [{wrt}], {tensor(cotangent)}, create_graph=True, "
                     "allow_unused=True)")
        lines.append(f"tangents = [{', '.join(tensor(tangents[n]) for n in moving)}]")
        lines.append("used = [(g, t) for g, t in zip(grads, tangents) if g is not None]")
        lines.append(f"print(torch.autograd.grad([g for g, _ in used], [{wrt}], [t for _, t in used], "
                     "allow_unused=True))")
    else:
        seed = view_code(layout, "cotangent", np.shape(cotangent), cotangent=True)
        if seed:
            lines.append(f"cotangent = {tensor(cotangent)}")
            lines.append(f"out.backward({seed})  # the layout it was handed in")
        else:
            lines.append(f"out.backward({tensor(cotangent)})")
        lines.append(f"print({', '.join(n + '.grad' for n in moving)})")
    return lines


def _number(value) -> str:
    return f"{float(value):.6g}"


def _show(array) -> str:
    if np.asarray(array).dtype.kind in "iu":  # labels and indices
        return repr(np.asarray(array).tolist())
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return repr(float(array))
    return np.array2string(array, precision=17, separator=", ", max_line_width=200,
                           formatter={"float_kind": lambda v: repr(float(v))})


# Names a summation index takes in a formula as shown, the first that the formula leaves free.
SUMMATION_NAMES = "jklpqrstuvwabcdefh"
# A rational constant shown as a fraction up to this denominator (1/2, 2/3), else as a decimal.
SHOWN_DENOMINATOR = 16
# The name of the cotangent seeded into backward, as a formula shows it.
COTANGENT_NAME = "g"


def readable(expr, output: str, indices: tuple = (), reserved=frozenset()) -> str:
    """A formula as text, read as math: ``g`` for the cotangent seeded into backward (the
    output's adjoint), (∂o/∂y) for another node's adjoint, dx for x's tangent, summation
    indices named j, k, ... (none of ``indices``, the formula's free ones, nor of ``reserved``,
    the spec's names), and a constant such as 0.044715 as a decimal, not as the fraction sympy
    holds."""
    def shown(name: str) -> str | None:
        if name in (ADJOINT_PREFIX + output, COTANGENT):
            return COTANGENT_NAME
        if name.startswith(COTANGENT_PREFIX):
            return f"{COTANGENT_NAME}_{name.removeprefix(COTANGENT_PREFIX)}"
        if name.startswith(ADJOINT_PREFIX):
            return f"(∂{output}/∂{name.removeprefix(ADJOINT_PREFIX)})"
        if name.startswith(TANGENT_PREFIX):
            return f"d{name.removeprefix(TANGENT_PREFIX)}"
        return None

    expr = unmarked(expr)
    renamed = {}
    for base in expr.atoms(sympy.IndexedBase):
        if shown(base.name):
            renamed[base] = sympy.IndexedBase(shown(base.name))
    taken = {str(i) for i in indices} | {str(b) for b in expr.atoms(sympy.IndexedBase)} | set(reserved)
    taken |= {s.name for s in expr.free_symbols if isinstance(s, sympy.Symbol)}
    free_names = (name for name in SUMMATION_NAMES if name not in taken)
    for symbol in sorted(expr.atoms(sympy.Symbol), key=lambda s: s.name):
        if shown(symbol.name):
            renamed[symbol] = sympy.Symbol(shown(symbol.name))
        elif symbol.name.startswith("_"):  # a summation index: its own assumptions, a reader's name
            renamed[symbol] = sympy.Symbol(next(free_names, symbol.name.lstrip("_")), **symbol.assumptions0)
    for number in expr.atoms(sympy.Rational):
        if number.q > SHOWN_DENOMINATOR and _terminates(number.q):
            renamed[number] = sympy.Symbol(re.sub(r"e([+-])0", r"e\1", repr(float(number))))  # 1e-6, not 1e-06
    return str(expr.xreplace(renamed))


def _terminates(denominator: int) -> bool:
    """Whether 1/denominator is a finite decimal: only 2s and 5s divide it."""
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    return denominator == 1
