"""Lowering to torch: the spec as a batched computation whose autograd is under test.

Every tensor carries a leading batch dimension, one row per point, so one forward and one
backward verify a whole batch. Constants stay Python numbers, as a user would write them
(``x**2`` records ``PowBackward0``), and every tracked node keeps its gradient
(``retain_grad``), so a wrong backward can be traced to the node that computed it.
"""

from __future__ import annotations

import torch

from ..ir import Apply, Constant, Input, Node, Ref, SizeRef, Spec, concrete_dim, concrete_shape, is_integer
from ..ops import REGISTRY, SIZE_PARAMS, concrete_items, normalize_axes, single_axis


class TorchProgram:
    """Runs a spec in torch. ``tracked`` maps the nodes whose tensors are returned to names."""

    def __init__(self, spec: Spec, tracked: dict):
        self.spec = spec
        self.tracked = tracked

    def run(self, inputs: dict, sizes: dict, dtype: torch.dtype, retain: bool = True) -> dict:
        """Forward pass on ``inputs`` (name -> tensor of shape (batch, *shape)).

        Returns name -> tensor for every tracked node, with gradients retained unless
        ``retain`` is false (torch.func transforms do not allow it).
        """
        evaluation = _Evaluation(inputs, sizes, dtype)
        results = {}
        for node, name in self.tracked.items():
            tensor = evaluation.value(node)
            if retain and isinstance(tensor, torch.Tensor) and tensor.requires_grad and not isinstance(node, Input):
                tensor.retain_grad()
            results[name] = tensor
        return results


class _Evaluation:
    def __init__(self, inputs: dict, sizes: dict, dtype: torch.dtype):
        self.inputs = inputs
        self.sizes = sizes
        self.dtype = dtype
        self.memo = {}

    def value(self, node: Node):
        key = id(node)
        if key not in self.memo:
            method = getattr(self, "_" + type(node).__name__, None)
            if method is None:
                raise NotImplementedError(f"the torch lowering has no rule for {type(node).__name__}")
            self.memo[key] = method(node)
        return self.memo[key]

    def _Input(self, node: Input):
        return self.inputs[node.name]

    def _Constant(self, node: Constant):
        # A small int stays an int, so `x**2` is the integer power users write.
        return int(node.value) if node.value.is_Integer and abs(node.value) < 2**31 else float(node.value)

    def _SizeRef(self, node: SizeRef):
        return int(self.sizes[node.symbol.name])

    def _Ref(self, node: Ref):
        return self.value(node.target)

    def _Apply(self, node: Apply):
        op = REGISTRY[node.op]
        params = dict(node.params)
        operands = [self.value(a) for a in node.operands]
        if not op.numbers_ok or not any(isinstance(o, torch.Tensor) for o in operands):
            device = next(o.device for o in self.inputs.values())
            operands = [o if isinstance(o, torch.Tensor) else torch.tensor(o, dtype=self.dtype, device=device)
                        for o in operands]
        if op.kind == "elementwise":
            return op.torch_form(*(_align(o, node.rank) for o in operands))
        (operand, *_) = operands
        if op.kind == "reduction":
            axes = normalize_axes(params.pop("axis", None), node.operands[0].rank)
            keepdim = params.pop("keepdims", False)
            if not axes:  # a reduction over no axis still makes a node of its own
                return op.torch_form(operand.unsqueeze(-1), (-1,), False, **params)
            return op.torch_form(operand, tuple(a + 1 for a in axes), keepdim, **params)
        if op.kind == "axiswise":
            return op.torch_form(operand, single_axis(params, node.operands[0].rank) + 1)
        if "items" in params:
            params["items"] = concrete_items(params["items"], self.sizes)
        for key in SIZE_PARAMS & params.keys():
            params[key] = concrete_shape(params[key], self.sizes) if key == "shape" else concrete_dim(
                params[key], self.sizes)
        result = op.torch_form(operands, params)
        if not is_integer(node) and not (result.is_floating_point() or result.dtype == torch.bool):
            result = result.to(self.dtype)  # one_hot's integers are reals to the spec
        return result


def _align(operand, rank: int):
    """Insert size-1 dims after the batch dim so that a batched operand broadcasts as in the spec."""
    if not isinstance(operand, torch.Tensor) or operand.dim() == 0:
        return operand
    missing = rank - (operand.dim() - 1)
    return operand.reshape(operand.shape[:1] + (1,) * missing + operand.shape[1:]) if missing else operand
