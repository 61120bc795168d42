"""Torch's own ops where they are off from exact math, as recorded in docs/findings.md.

A failure of the spec's own torch lowering at one of these ops, in its dtype, check and
regime, is named in the report as that finding: the check still fails (torch is what is
off), and the user need not debug their spec. Each regime is a predicate on the op's
operands at the failing point (float64 values, one array per operand), in the terms of the
finding's row: where a step of torch's formula leaves the dtype's range, say.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .ir import Apply, Input, Ref
from .tolerance import HALF_TYPES

FINDINGS_DOC = "docs/findings.md"
EVERY_DTYPE = (torch.float64, torch.float32, *HALF_TYPES)
DERIVATIVES = frozenset({"gradient", "JVP"})


@dataclass(frozen=True)
class Finding:
    """A recorded disagreement of torch's ``op``: in ``dtypes``, for ``checks`` (as failures
    name them: value, gradient, JVP, HVP), where ``regime(operands, dtype)`` holds."""

    op: str
    dtypes: tuple
    checks: frozenset
    what: str  # the row's gist
    regime: Callable = lambda operands, dtype: True


def _largest(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _smallest_normal(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


def _magnitude(operands) -> float:
    return max((float(np.max(np.abs(o), initial=0.0)) for o in operands), default=0.0)


def _square_overflows(operands, dtype) -> bool:
    return _magnitude(operands) > math.sqrt(_largest(dtype))


def _square_leaves_range(operands, dtype) -> bool:
    """x² + y² overflows, or underflows below the normal range, for some element."""
    with np.errstate(over="ignore"):
        squares = sum(np.asarray(o, dtype=np.float64) ** 2 for o in operands)
    return bool(np.any(squares > _largest(dtype)) or np.any(squares < _smallest_normal(dtype)))


def _cube_of_rsqrt_overflows(operands, dtype) -> bool:
    with np.errstate(divide="ignore"):
        return bool(np.any(np.abs(np.asarray(operands[0], dtype=np.float64)) ** -1.5 > _largest(dtype)))


def _exp_overflows(operands, dtype) -> bool:
    compute = torch.float32 if dtype in HALF_TYPES else dtype
    return _magnitude(operands) > math.log(_largest(compute))


def _apart_by_precision(operands, dtype) -> bool:
    a, b = (np.abs(np.asarray(o, dtype=np.float64)) for o in operands)
    with np.errstate(all="ignore"):
        ratio = np.maximum(a / b, b / a)
    return bool(np.any(ratio >= 1 / torch.finfo(dtype).eps))


def _partial_products(operands) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.cumprod(np.asarray(operands[0], dtype=np.float64), axis=-1)


def _partial_product_overflows(operands, dtype) -> bool:
    return bool(np.any(np.abs(_partial_products(operands)) > _largest(dtype)))


def _product_below_normal(operands, dtype) -> bool:
    """A partial product below the normal range (or flushed to 0) while no factor is 0."""
    partial = np.abs(_partial_products(operands))
    nonzero = np.logical_and.accumulate(np.asarray(operands[0]) != 0, axis=-1)
    return bool(np.any(nonzero & (partial < _smallest_normal(dtype))))


def _partial_sums_may_overflow(operands, dtype) -> bool:
    """A sum of products of a direction (at most 4 in magnitude) and one operand's elements
    past the dtype's largest number: a gradient's partial sums may overflow there."""
    return 4 * max(float(np.sum(np.abs(o))) for o in operands) > _largest(dtype)


def _partial_product_leaves_normal_range(operands, dtype) -> bool:
    return _partial_product_overflows(operands, dtype) or _product_below_normal(operands, dtype)


def _cumprod_regime(operands, dtype) -> bool:
    return dtype in HALF_TYPES or _product_below_normal(operands, dtype) or np.any(np.asarray(operands[0]) == 0)


def _exp_of_minus_x_subnormal(operands, dtype) -> bool:
    return _magnitude(operands) > -math.log(_smallest_normal(dtype))


def _singular_within_rounding(operands, dtype) -> bool:
    """|det A| within a rounding of the product of A's row norms (its Hadamard bound), or
    below the dtype's normal range, where torch's det may be 0."""
    matrix = np.asarray(operands[0], dtype=np.float64)
    bound = np.prod(np.linalg.norm(matrix, axis=-1), axis=-1)
    determinant = np.abs(np.linalg.det(matrix))
    return bool(np.any((determinant <= torch.finfo(dtype).eps * bound) | (determinant < _smallest_normal(dtype))))


FINDINGS = (
    Finding("digamma", (torch.float64,), frozenset({"gradient"}), "trigamma, digamma's derivative, is off by "
            "about 5e-10 relative in float64"),
    Finding("logcumsumexp", EVERY_DTYPE, frozenset({"JVP"}), "the forward mode of an element changes with later "
            "elements, on which it does not depend"),
    *(Finding(op, (torch.float64, torch.float32), frozenset({"JVP"}), "the forward mode loses the selected tangent "
              "when the other one is 1/eps times larger", _apart_by_precision) for op in ("minimum", "maximum")),
    Finding("asinh", EVERY_DTYPE, DERIVATIVES, "the backward forms x², which overflows where the derivative is "
            "representable", _square_overflows),
    Finding("acosh", (torch.float32, *HALF_TYPES), DERIVATIVES | {"HVP"}, "the backward forms x², which overflows "
            "where the derivative is representable", _square_overflows),
    Finding("atan2", EVERY_DTYPE, DERIVATIVES | {"HVP"}, "the backward forms 1 / (x² + y²), which underflows or "
            "overflows where the derivative is representable", _square_leaves_range),
    *(Finding(op, (torch.float32, torch.bfloat16), frozenset({"value", "gradient", "JVP"}), "the vectorized kernel "
              "forms exp(x) first, which overflows before the result does", _exp_overflows) for op in ("sinh", "cosh")),
    Finding("sinc", (torch.float16,), DERIVATIVES, "the backward forms πx², which overflows float16",
            _square_overflows),
    Finding("atan", (torch.float16,), DERIVATIVES, "the backward and forward mode form x² + 1 in float16, which "
            "overflows at |x| >= 256 where the derivative 1 / (x² + 1) is representable", _square_overflows),
    Finding("cumprod", EVERY_DTYPE, DERIVATIVES | {"HVP"}, "the formulas divide by x, or by the saved result, which "
            "underflows or rounds where the products they stand for do not", _cumprod_regime),
    Finding("logsigmoid", (torch.float64, torch.float32), frozenset({"HVP"}), "the second derivative is computed "
            "from sigmoid's saved terms, which cancel", _exp_of_minus_x_subnormal),
    Finding("norm", (torch.float64, torch.float32, torch.bfloat16), frozenset({"value", "gradient", "JVP"}),
            "the squares overflow where the norm is representable", _square_overflows),
    Finding("std", (torch.float64,), frozenset({"value", "gradient", "JVP"}), "the squares overflow where the "
            "result is representable", _square_overflows),
    Finding("rsqrt", EVERY_DTYPE, DERIVATIVES, "the backward forms the result cubed before it scales by the "
            "cotangent (-0.5 * grad * result³), which overflows where the gradient is representable",
            _cube_of_rsqrt_overflows),
    Finding("prod", EVERY_DTYPE, DERIVATIVES | {"HVP"}, "the backward divides the saved product by each factor, "
            "and a product below the normal range has lost digits", _product_below_normal),
    Finding("prod", EVERY_DTYPE, DERIVATIVES, "the backward picks its formula by whether any element of the whole "
            "tensor is 0 (the product divided by each factor, or the products of the others), and the two differ "
            "where partial products leave the normal range: stacked rows depend on each other there",
            _partial_product_leaves_normal_range),
    *(Finding(op, (torch.float16,), DERIVATIVES, "the backward accumulates its partial sums in float16 (CPU), "
              "which overflow where the gradient is representable", _partial_sums_may_overflow)
      for op in ("conv1d", "conv2d")),
    Finding("det", (torch.float64, torch.float32), DERIVATIVES, "the backward of a matrix singular within "
            "rounding, or whose det underflows, is 0, not the adjugate", _singular_within_rounding),
    *(Finding(op, (torch.float64, torch.float32), frozenset({"value", *DERIVATIVES}), "the partial products are "
              "formed in order, and an overflowed one times a zero factor is NaN", _partial_product_overflows)
      for op in ("prod", "cumprod")),
)


def recorded(op: str, dtype: torch.dtype, check: str) -> bool:
    """Whether a failure of ``check`` on torch's ``op`` in ``dtype`` is a recorded finding, in
    some regime."""
    return any(f.op == op and dtype in f.dtypes and check in f.checks for f in FINDINGS)


def matching(nodes: dict, values: dict, point_inputs: dict, dtype: torch.dtype, check: str) -> list:
    """The findings of the ops among ``nodes`` (label -> node, a plan's) whose check, dtype
    and regime match a failure: ``values`` (label -> float64 value at the point) and
    ``point_inputs`` (input name -> value) give the operands."""
    labels = {id(node): label for label, node in nodes.items()}
    found = []

    def operand_value(operand):
        if isinstance(operand, Input):
            return point_inputs.get(operand.name)
        if isinstance(operand, Ref):
            return values.get(operand.name)
        return values.get(labels.get(id(operand)))

    for node in _applications(nodes.values()):
        for finding in FINDINGS:
            if finding.op != node.op or dtype not in finding.dtypes or check not in finding.checks:
                continue
            operands = [operand_value(o) for o in node.operands]
            if all(o is not None for o in operands) and finding.regime(operands, dtype) and finding not in found:
                found.append(finding)
    return found


def _applications(roots) -> list:
    seen, found = set(), []

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Apply):
            found.append(node)
        for arg in node.args:
            visit(arg)

    for node in roots:
        visit(node)
    return found
