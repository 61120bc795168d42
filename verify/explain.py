"""The ``explain`` walkthrough: one point, every node, both sides of the chain rule.

For the spec's example point it lists each node's value and torch's ``grad_fn`` (forward),
then sympy's ∂o/∂node, that formula's value and autograd's value side by side (backward),
then the status of each claim. Unnamed subexpressions such as ``sum(y)`` are nodes too,
so the walk shows every factor of the chain rule.
"""

from __future__ import annotations

import numpy as np
import torch

from . import engine
from .ir import Constant, Input, Ref, SizeRef, Spec, depends_on_inputs
from .report import proved
from .strategies import Example
from .tolerance import allowed_error

DEFAULT_SIZE = 3


def explain(spec: Spec, dtype: torch.dtype = torch.float64) -> str:
    """The walkthrough of ``spec`` at its example point (or a fixed point when it has none)."""
    tracked = _all_nodes(spec)
    prepared = engine.build_plan(spec, tracked)
    point = engine.example_point(spec, dtype) or _default_point(spec, prepared, dtype)
    values, gradients, _ = engine.reference_side(prepared, point)
    keep = np.ones(point.batch, dtype=bool)
    actual_values, actual_gradients, grad_fns = engine.autograd_side(prepared, point, keep, dtype)

    sizes = ", ".join(f"{k} = {v}" for k, v in point.sizes.items())
    where = ", ".join(f"{name} = {_show(array[0])}" for name, array in point.inputs.items())
    lines = [f"explain {spec.path or '<spec>'} at {where}" + (f" ({sizes})" if sizes else "") + f", {dtype}", ""]

    lines.append("forward: each node's value and the grad_fn torch records")
    rows = [("node", "definition", "value", "grad_fn")]
    for node, name in tracked.items():
        if isinstance(node, Input):
            rows.append((name, f"input: {node.domain}", _show(point.inputs[name][0]), "(leaf)"))
        else:
            rows.append((name, node.loc.text if name not in spec.nodes else spec.locs[name].text.split("=", 1)[1].strip(),
                         _show(actual_values[name][0]), grad_fns.get(name, "-")))
    lines.extend(_table(rows))
    lines.append("")

    output = spec.output
    lines.append(f"backward: ∂{output}/∂node from sympy, its value, and autograd's .grad")
    rows = [("node", f"∂{output}/∂node (sympy)", "value", "autograd", "agree")]
    for name in reversed(list(prepared.gradients)):
        formula = prepared.gradients[name].tensor.expr
        reference, error = gradients[name]
        actual = actual_gradients[name]
        agree = bool(np.all(np.abs(actual - reference) <= allowed_error(reference, error, dtype)))
        rows.append((name, str(formula), _show(reference[0]), _show(actual[0]), "yes" if agree else "NO"))
    lines.extend(_table(rows))

    if prepared.claims:
        lines.append("")
        lines.append("claims")
        for claim in prepared.claims:
            status = proved(spec.size_symbols) if claim.proved else "not proved symbolically (checked numerically by `verify check`)"
            lines.append(f"  assert {claim.text}: {status}")
    return "\n".join(lines)


def _all_nodes(spec: Spec) -> dict:
    """Inputs, then every non-constant node of the graph in evaluation order, with a label."""
    tracked = {node: name for name, node in spec.inputs.items()}
    labels = set(tracked.values()) | set(spec.nodes)
    named = {id(node): name for name, node in spec.nodes.items()}

    def visit(node):
        if node in tracked or isinstance(node, (Constant, SizeRef)) or not depends_on_inputs(node):
            return
        for operand in node.args:
            visit(operand)
        if isinstance(node, Ref):
            return
        label = named.get(id(node)) or node.loc.text
        if label not in spec.nodes and any(c in label for c in " +-*/@"):
            label = f"({label})"  # so that sympy prints (W @ x)[i], not W @ x[i]
        while label in labels and named.get(id(node)) != label:
            label += "'"
        labels.add(label)
        tracked[node] = label

    for node in spec.nodes.values():
        visit(node)
    return tracked


def _default_point(spec: Spec, prepared, dtype) -> Example:
    """A fixed point inside every domain, for specs that give no example point."""
    sizes = {name: DEFAULT_SIZE for name in spec.size_symbols}
    rng = np.random.default_rng(0)
    inputs = {}
    for name, declared in spec.inputs.items():
        low = max(declared.domain.low, -2.0)
        high = min(declared.domain.high, 2.0)
        low, high = (low + 0.1, high) if declared.domain.low_open else (low, high)
        shape = (1, *(d if isinstance(d, int) else sizes[d.name] for d in declared.shape))
        sample = rng.uniform(low, high, size=shape).round(2)
        inputs[name] = torch.tensor(sample, dtype=dtype).double().numpy()
    cotangent_shape = prepared.cotangent_shape
    cotangent = None if cotangent_shape is None else np.ones(
        (1, *(d if isinstance(d, int) else sizes[d.name] for d in cotangent_shape)))
    return Example(sizes, inputs, cotangent)


def _show(array) -> str:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return f"{float(array):.6g}"
    return np.array2string(array, separator=", ", max_line_width=10**9,
                           formatter={"float_kind": lambda v: f"{v:.6g}"}).replace("\n", "")


def _table(rows) -> list:
    widths = [max(len(str(row[k])) for row in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
