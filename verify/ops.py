"""The op registry: the single place that knows each operation.

Each ``Op`` carries its shape rule, its sympy form, its torch form and its domain, so a
lowering never hard-codes an operation and adding one is one entry here plus a test row.

The forms depend on the op's ``kind``:

* ``elementwise``: ``sympy_form(*scalars)`` and ``torch_form(*tensors)`` on broadcast
  arguments.
* ``reduction``: ``sympy_form(total, count)`` receives the index-notation ``Sum`` over the
  reduced axes and the number of elements summed; ``torch_form(tensor, dims, keepdim)``.
* ``structural`` (``@``, ``.T``): ``sympy_form(element, index, shapes, fresh_index)`` builds
  one output element from argument elements; ``torch_form(*tensors)`` sees a leading batch
  dimension on every argument.

Torch forms always receive tensors with a leading batch dimension (one row per point), so
reduction dims arrive already shifted past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
import torch

from .ir import ShapeError, broadcast_shapes


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    arity: int
    sympy_form: Callable
    torch_form: Callable
    infer_shape: Callable  # (operand shapes, params dict) -> shape; raises ShapeError
    domain: str = "all reals"
    params: tuple = ()  # keyword parameters the spec may pass


def _elementwise_shape(shapes, params):
    return broadcast_shapes(*shapes)


def normalize_axes(axis, rank: int) -> tuple:
    """``axis`` (None, an int or a tuple of ints, negatives allowed) as sorted positive axes."""
    if axis is None:
        return tuple(range(rank))
    axes = axis if isinstance(axis, tuple) else (axis,)
    normalized = []
    for a in axes:
        if not -rank <= a < rank:
            raise ShapeError(f"axis {a} is out of range for an operand of rank {rank}")
        normalized.append(a % rank)
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"axis {axis} repeats an axis")
    return tuple(sorted(normalized))


def _reduction_shape(shapes, params):
    (shape,) = shapes
    axes = normalize_axes(params.get("axis"), len(shape))
    if params.get("keepdims", False):
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _matmul_shape(shapes, params):
    a, b = shapes
    if not (1 <= len(a) <= 2 and 1 <= len(b) <= 2):
        raise ShapeError(f"@ takes vectors and matrices, got operands of rank {len(a)} and {len(b)}")
    inner_a, inner_b = a[-1], b[0]
    if inner_a != inner_b:
        raise ShapeError(f"@ needs matching inner sizes, got {_show(a)} @ {_show(b)} ({inner_a} != {inner_b})")
    return a[:-1] + b[1:]


def _matmul_sympy(element, index, shapes, fresh_index):
    a, b = shapes
    k, limits = fresh_index(a[-1])
    left = tuple(index[: len(a) - 1]) + (k,)
    right = (k,) + tuple(index[len(a) - 1:])
    return sympy.Sum(element(0, left) * element(1, right), limits)


def _matmul_torch(a, b):
    # Every operand carries a leading batch dim ('z'); contract a's last axis with b's first.
    left = "z" + "ij"[2 - (a.dim() - 1):]
    right = "z" + "jk"[: b.dim() - 1]
    out = "z" + left[1:-1] + right[2:]
    return torch.einsum(f"{left},{right}->{out}", a, b)


def _transpose_shape(shapes, params):
    (shape,) = shapes
    if len(shape) != 2:
        raise ShapeError(f".T needs a matrix, got an operand of rank {len(shape)}")
    return (shape[1], shape[0])


def _show(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _elementwise(name, arity, sympy_form, torch_form, domain="all reals"):
    return Op(name, "elementwise", arity, sympy_form, torch_form, _elementwise_shape, domain)


def _reduction(name, sympy_form, torch_form):
    return Op(name, "reduction", 1, sympy_form, torch_form, _reduction_shape, params=("axis", "keepdims"))


REGISTRY: dict[str, Op] = {
    op.name: op
    for op in [
        _elementwise("add", 2, lambda a, b: a + b, torch.add),
        _elementwise("sub", 2, lambda a, b: a - b, torch.sub),
        _elementwise("mul", 2, lambda a, b: a * b, torch.mul),
        _elementwise("div", 2, lambda a, b: a / b, torch.div, domain="b != 0"),
        _elementwise("pow", 2, lambda a, b: a**b, torch.pow, domain="a > 0, or b an integer"),
        _elementwise("neg", 1, lambda a: -a, torch.neg),
        # A fresh view, so that `y = x` gives y a gradient of its own, as a named node needs.
        _elementwise("pos", 1, lambda a: a, lambda a: a.view_as(a)),
        _elementwise("exp", 1, sympy.exp, torch.exp),
        _elementwise("log", 1, sympy.log, torch.log, domain="x > 0"),
        _elementwise("sqrt", 1, sympy.sqrt, torch.sqrt, domain="x >= 0 (derivative: x > 0)"),
        _elementwise("sin", 1, sympy.sin, torch.sin),
        _elementwise("cos", 1, sympy.cos, torch.cos),
        _elementwise("tanh", 1, sympy.tanh, torch.tanh),
        _reduction("sum", lambda total, count: total, torch.sum),
        _reduction("mean", lambda total, count: total / count, torch.mean),
        Op("matmul", "structural", 2, _matmul_sympy, _matmul_torch, _matmul_shape),
        Op("transpose", "structural", 1,
           lambda element, index, shapes, fresh_index: element(0, (index[1], index[0])),
           lambda t: t.transpose(-1, -2), _transpose_shape),
    ]
}
