"""What ``check_function`` calls: a module's parameters bound to spec inputs, and several
outputs folded into one.

A module is checked as a function of all the spec's inputs: those named after its
parameters are put in the parameters' place (``torch.func.functional_call``), so their
gradients are compared like any input's; the rest go to ``forward``, in declaration order.

A function that returns a tuple is checked against named nodes of the spec: each output is
paired with a random cotangent (a data input of the spec), and the check sees the sum of
their products, whose VJP is the sum of each output's and whose value differs wherever one
output's does.
"""

from __future__ import annotations

import dataclasses
from functools import reduce

import torch

from .errors import SpecError
from .ir import Apply, Domain, Input, Loc, Ref, Spec
from .subject import function_name

# Cotangents of the outputs: never 0, which would turn an output that overflows into 0 * inf.
COTANGENT_DOMAIN = Domain("Interval", 0.5, 2.0, low_open=False, high_open=False)
COTANGENT_PREFIX = "_cotangent_of_"


def bind_module(module: torch.nn.Module, spec: Spec, parameters: dict | None) -> tuple:
    """(a function of the spec's inputs that calls ``module``, the sizes its parameters fix).

    ``parameters`` maps spec input names to parameter names (``{"W": "0.weight"}``); by
    default each parameter binds the input named as it is (``spec_name``)."""
    named = dict(module.named_parameters())
    binding = parameters if parameters is not None else {
        spec_name(name): name for name in named if spec_name(name) in spec.inputs}
    for input_name, parameter in binding.items():
        if parameter not in named:
            raise SpecError(f"{type(module).__name__} has no parameter {parameter!r}; it has: {', '.join(named)}")
        if input_name not in spec.inputs or spec.inputs[input_name].data:
            raise SpecError(f"the parameter {parameter} is bound to {input_name!r}, which is no differentiated "
                            f"input of the spec")
    unbound = [name for name, p in named.items() if p.requires_grad and name not in binding.values()]
    if unbound:
        declarations = "; ".join(f"{spec_name(name)}: Real{list(named[name].shape)}" for name in unbound)
        raise SpecError(f"the parameters {', '.join(unbound)} of {type(module).__name__} are not inputs of the spec",
                        hint=f"declare them as inputs ({declarations}), or bind inputs of your own names to them: "
                             f"parameters={{'W': {unbound[0]!r}}}")
    sizes = {}
    for input_name, parameter in binding.items():
        declared, actual = spec.inputs[input_name].shape, tuple(named[parameter].shape)
        if len(declared) != len(actual):
            raise SpecError(f"{input_name} has rank {len(declared)}; the parameter {parameter} has shape {actual}")
        for dim, size in zip(declared, actual):
            if isinstance(dim, int) and dim != size or sizes.setdefault(str(dim), size) != size:
                raise SpecError(f"{input_name} is declared {list(declared)}; the parameter {parameter} has shape "
                                f"{actual}")
    sizes = {name: size for name, size in sizes.items() if name in spec.size_symbols}
    arguments = [name for name in spec.inputs if name not in binding]

    def call(*tensors):
        given = dict(zip(spec.inputs, tensors))
        return torch.func.functional_call(module, {binding_of: given[name] for name, binding_of in binding.items()},
                                          tuple(given[name] for name in arguments))

    call.__qualname__ = type(module).__name__
    call.reproduce_arguments = [] if parameters is None else [f"parameters={parameters!r}"]
    return call, sizes


def spec_name(parameter: str) -> str:
    """The spec input a parameter binds by default: dots made underscores, and a p before a
    leading digit (nn.Sequential's ``0.weight`` is ``p0_weight``)."""
    name = parameter.replace(".", "_")
    return "p" + name if name[:1].isdigit() else name


def combine_outputs(fn, spec: Spec, names: tuple) -> tuple:
    """(a function returning the cotangent-weighted sum of ``fn``'s outputs, the spec whose
    output is that sum of the nodes ``names``). Both say, in ``reproduce_arguments``, what a
    failure's reproduce line passes to ``check_function`` besides the function."""
    for name in names:
        if name not in spec.nodes:
            raise SpecError(f"outputs: {name!r} is no named node of the spec; named nodes: {', '.join(spec.nodes)}")
    inputs, terms = dict(spec.inputs), []
    loc = spec.locs[names[-1]]
    for name in names:
        node = spec.nodes[name]
        cotangent = Input(node.shape, loc, name=COTANGENT_PREFIX + name, domain=COTANGENT_DOMAIN, data=True)
        inputs[cotangent.name] = cotangent
        product = Apply(node.shape, Loc(loc.line, loc.column, f"cotangent * {name}"), op="mul",
                        operands=(cotangent, Ref(node.shape, loc, name=name, target=node)))
        terms.append(Apply((), Loc(loc.line, loc.column, f"sum(cotangent * {name})"), op="sum", operands=(product,))
                     if node.shape else product)
    total = reduce(lambda a, b: Apply((), Loc(loc.line, loc.column, "+"), op="add", operands=(a, b)), terms)
    label = "(" + ", ".join(names) + ")"
    combined = dataclasses.replace(spec, inputs=inputs, nodes={**spec.nodes, label: total},
                                   locs={**spec.locs, label: loc}, claims=[])
    given = len(spec.inputs)

    def outputs(*tensors):
        results = fn(*tensors[:given])
        if not isinstance(results, (tuple, list)) or len(results) != len(names):
            raise TypeError(f"expected a tuple of {len(names)} outputs {label}, got {type(results).__name__}")
        total = 0
        for name, cotangent, result in zip(names, tensors[given:], results):
            if tuple(result.shape) != tuple(cotangent.shape):
                raise ValueError(f"the output {name} has shape {tuple(result.shape)}; the spec says "
                                 f"{tuple(cotangent.shape)}")
            total = total + (cotangent * result).sum()
        return total

    outputs.__qualname__ = function_name(fn)
    outputs.reproduce_arguments = [*getattr(fn, "reproduce_arguments", []), f"outputs={names!r}"]
    return outputs, combined
