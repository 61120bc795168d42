"""The ``explain`` walkthrough: one point, every node, both sides of the chain rule.

For the spec's example point it lists each node's value and torch's ``grad_fn`` (forward),
then ∂o/∂node by the chain rule (its consumers' adjoints times sympy's derivative of their
steps), that formula's value and autograd's value side by side (backward), then the status
of each claim. Unnamed subexpressions such as ``sum(y)`` are nodes too,
so the walk shows every factor of the chain rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import oracle
from . import plan as planning
from .ir import Input, Spec, concrete_shape
from .lower.sympy import adjoint_name
from .checks import shown_formula
from .report import COTANGENT_NAME, proved
from .strategies import Example, size_bounds
from .tolerance import allowed_error, precision

DEFAULT_SIZE = 3


def explain(spec: Spec, dtype: torch.dtype = torch.float64) -> str:
    """The walkthrough of ``spec`` at its example point (or a fixed point when it has none)."""
    point = planning.example_point(spec, dtype) or _default_point(spec, dtype)
    tracked = planning.labelled_nodes(spec)
    sizes = point.sizes if planning.needs_concrete_sizes(spec) else None
    prepared = planning.build_plan(spec, tracked, sizes)
    model = precision(dtype)
    ctx, _ = oracle.reference_values(prepared, point, model)
    oracle.backward(prepared, ctx, lambda reference: reference(ctx), exact=False)
    gradients = {label: ctx.env[adjoint_name(label)] for label in prepared.adjoints}
    shapes = {name: concrete_shape(reference.tensor.shape, point.sizes) for name, reference in prepared.values.items()}
    gradient_shapes = {name: concrete_shape(reference.tensor.shape, point.sizes)
                       for name, reference in prepared.adjoints.items()}
    actual_values, actual_gradients, grad_fns = prepared.subject.reverse(point, shapes, gradient_shapes, dtype)

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
    lines.append(f"backward: ∂{output}/∂node from sympy, its value, and autograd's .grad "
                 f"({COTANGENT_NAME}: the cotangent handed to backward, 1 here)")
    rows = [("node", f"∂{output}/∂node (sympy)", "value", "autograd", "agree")]
    for name in reversed(list(prepared.adjoints)):
        formula = shown_formula(prepared, prepared.adjoints[name].tensor)
        reference, error = gradients[name]
        actual = actual_gradients[name]
        agree = bool(np.all(np.abs(actual - reference) <= allowed_error(error, model, reference)))
        rows.append((name, str(formula), _show(reference[0]), _show(actual[0]), "yes" if agree else "NO"))
    lines.extend(_table(rows))

    if prepared.claims:
        lines.append("")
        lines.append("claims")
        for claim in prepared.claims:
            status = (proved(spec.size_symbols) if claim.proved else
                      f"not proved symbolically: {claim.unproved} (checked numerically by `verify check`)")
            lines.append(f"  assert {claim.text}: {status}")
    return "\n".join(lines)


def _default_point(spec: Spec, dtype) -> Example:
    """A fixed point inside every domain, for specs that give no example point."""
    sizes = {name: max(low, min(DEFAULT_SIZE, high)) for name, (low, high) in size_bounds(spec).items()}
    rng = np.random.default_rng(0)
    inputs = {}
    for name, declared in spec.inputs.items():
        domain = declared.domain
        # Inside the domain, away from open ends: within 2 of 0 where the domain allows.
        low = domain.low if math.isfinite(domain.low) else min(-2.0, domain.high - 4.0)
        high = domain.high if math.isfinite(domain.high) else max(2.0, low + 4.0)
        low, high = max(low, min(-2.0, high - 4.0)), min(high, max(2.0, low + 4.0))
        width = high - low
        sample = rng.uniform(low + 0.1 * width, high - 0.1 * width, size=(1, *concrete_shape(declared.shape, sizes)))
        inputs[name] = torch.tensor(sample, dtype=dtype).double().numpy()
    return Example(sizes, inputs, *planning.unit_directions(spec, sizes, inputs, tangents=False))


def _show(array) -> str:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return f"{float(array):.6g}"
    return np.array2string(array, separator=", ", max_line_width=10**9,
                           formatter={"float_kind": lambda v: f"{v:.6g}"}).replace("\n", "")


def _table(rows) -> list:
    widths = [max(len(str(row[k])) for row in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
