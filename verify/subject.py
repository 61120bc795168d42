"""What is under test, on the torch side: the spec's own torch lowering, or a user's function.

Both answer the same questions on a batch of points: values and vector-Jacobian products
(reverse mode), Jacobian-vector products (forward mode), and Hessian-vector products (by
double backward, and forward-over-reverse). Arrays go in and come out in float64, with a
leading batch dimension.

The spec's lowering runs the whole batch at once. A user's function takes one point's
tensors, so it is called once per point: it may not support batching, and its failures
(an exception, a wrong shape) belong to the point that caused them.
"""

from __future__ import annotations

import os
import traceback

import numpy as np
import torch
from torch.autograd import forward_ad

from .ir import Spec
from .lower.torch import TorchProgram
from .strategies import input_dtype


class CodeFailure(Exception):
    """The code under test raised, or returned something of the wrong shape, at one point."""

    def __init__(self, check: str, point: int, message: str):
        self.check = check
        self.point = point
        self.message = message
        super().__init__(message)


class ModeUnsupported(Exception):
    """The code under test does not support a mode ("rev": its backward, "fwd": forward AD)
    or, where ``mode`` is "dtype", the dtype."""

    def __init__(self, message: str, mode: str = "dtype"):
        self.mode = mode
        super().__init__(message)


def _unsupported(exc: Exception) -> bool:
    """torch's way of saying a Function has no jvp, or an op has no kernel for a dtype."""
    return isinstance(exc, NotImplementedError) or "not implemented for" in str(exc)


def _array(tensor, shape) -> np.ndarray:
    if tensor is None:  # no path from the output: the derivative is 0
        return np.zeros(shape)
    # force: torch.func may hand back a ZeroTensor, a zero that numpy() refuses without it.
    return np.broadcast_to(tensor.detach().to("cpu", torch.float64).numpy(force=True), shape).copy()


class _Subject:
    """Tensors for either subject, on its device."""

    spec: Spec
    device: str

    def _tensor(self, array, dtype, requires_grad=False):
        return torch.tensor(array, dtype=dtype, device=self.device, requires_grad=requires_grad)

    def _input(self, name, array, dtype, requires_grad=False):
        """An input's tensor: integers (indices, labels) as int64, never differentiated."""
        return self._tensor(array, input_dtype(self.spec, name, dtype), requires_grad and differentiated(self.spec, name))


class SpecSubject(_Subject):
    """The spec's own torch lowering: every labelled node's value and gradient is checked."""

    name = "the spec's torch lowering"

    def __init__(self, spec: Spec, tracked: dict, device: str = "cpu"):
        self.spec = spec
        self.program = TorchProgram(spec, tracked)
        self.device = device

    def on(self, device: str) -> SpecSubject:
        """The same lowering, with its tensors on ``device``."""
        return self if device == self.device else SpecSubject(self.spec, self.program.tracked, device)


    def _run(self, leaves: dict, sizes: dict, dtype):
        try:
            return self.program.run(leaves, sizes, dtype)
        except Exception as exc:  # noqa: BLE001 - torch failing on a valid spec is a finding
            if _unsupported(exc):
                raise ModeUnsupported(str(exc)) from None
            raise CodeFailure("value", 0, f"torch raised {_describe(exc)}") from None

    def reverse(self, at, value_shapes: dict, gradient_shapes: dict, dtype) -> tuple:
        """(values, gradients, grad_fn names) for a backward seeded with the cotangent; no
        backward runs where ``gradient_shapes`` is empty."""
        leaves = {name: self._input(name, array, dtype, True) for name, array in at.inputs.items()}
        outputs = self._run(leaves, at.sizes, dtype)
        if gradient_shapes:
            outputs[self.spec.output].backward(self._tensor(at.cotangent, dtype))
        batch = at.batch
        values = {name: _array(_as_tensor(outputs[name], dtype), (batch, *shape))
                  for name, shape in value_shapes.items()}
        gradients, grad_fns = {}, {}
        for name, shape in gradient_shapes.items():
            holder = leaves[name] if name in leaves else outputs[name]
            gradients[name] = _array(holder.grad, (batch, *shape))
            grad_fns[name] = type(holder.grad_fn).__name__ if holder.grad_fn is not None else "(leaf)"
        return values, gradients, grad_fns

    def forward(self, at, dtype) -> np.ndarray:
        """The output's tangent (JVP) for the input tangents, by forward-mode AD."""
        with forward_ad.dual_level():
            duals = {name: _dual(self.spec, name, self._input(name, array, dtype), self._tensor(at.tangents[name], dtype))
                     for name, array in at.inputs.items()}
            output = _as_tensor(self._run(duals, at.sizes, dtype)[self.spec.output], dtype)
            tangent = forward_ad.unpack_dual(output).tangent
        return _array(tangent, at.cotangent.shape)

    def second(self, at, dtype, over_forward: bool) -> dict:
        """Hessian-vector products per input: by double backward, or by forward over reverse."""
        shapes = {name: array.shape for name, array in at.inputs.items()}
        seed = self._tensor(at.cotangent, dtype)
        if over_forward:
            with forward_ad.dual_level():
                leaves = {name: _dual(self.spec, name, self._input(name, array, dtype, True),
                                      self._tensor(at.tangents[name], dtype))
                          for name, array in at.inputs.items()}
                output = self._run(leaves, at.sizes, dtype)[self.spec.output]
                wrt = _differentiated_leaves(self.spec, leaves)
                try:
                    grads = torch.autograd.grad(output, list(wrt.values()), seed, allow_unused=True)
                except (NotImplementedError, RuntimeError) as exc:
                    raise ModeUnsupported(f"forward over reverse: {exc}") from None
                return {name: _array(None if g is None else forward_ad.unpack_dual(g).tangent, shapes[name])
                        for name, g in zip(wrt, grads)}
        leaves = {name: self._input(name, array, dtype, True) for name, array in at.inputs.items()}
        output = self._run(leaves, at.sizes, dtype)[self.spec.output]
        tangents = {name: self._tensor(t, dtype) for name, t in at.tangents.items()}
        wrt = _differentiated_leaves(self.spec, leaves)
        grads = torch.autograd.grad(output, list(wrt.values()), seed, create_graph=True, allow_unused=True)
        products = _products(dict(zip(wrt, grads)), wrt, tangents, torch.autograd.grad)
        return {name: _array(p, shapes[name]) for name, p in products.items()}


def differentiated(spec: Spec, name: str) -> bool:
    """Whether an input is differentiated: a data input (a label, a mask) gets no gradient."""
    return not spec.inputs[name].data


def _differentiated_leaves(spec: Spec, leaves: dict) -> dict:
    return {name: leaf for name, leaf in leaves.items() if differentiated(spec, name)}


def _dual(spec: Spec, name: str, tensor, tangent):
    """A forward-mode input: the tensor with its tangent, or a data input as it is."""
    return forward_ad.make_dual(tensor, tangent) if differentiated(spec, name) else tensor


def _products(grads: dict, leaves: dict, tangents: dict, grad) -> dict:
    """Σ_x ∂(g_x · t_x)/∂y for every input y: the Hessian-vector product by double backward.
    A gradient that does not require grad is constant in the inputs, or its backward cut
    the graph (a detach): it contributes nothing, which is what the check then sees."""
    live = [(n, g) for n, g in grads.items() if g is not None and g.requires_grad]
    if not live:
        return dict.fromkeys(leaves)
    second = grad([g for _, g in live], list(leaves.values()), [tangents[n] for n, _ in live], allow_unused=True)
    return dict(zip(leaves, second))


def _as_tensor(value, dtype):
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)


class FunctionSubject(_Subject):
    """A user's function of the spec's inputs (positional tensors, in declaration order),
    returning the output; only the output's value and the inputs' derivatives are seen."""

    def __init__(self, spec: Spec, fn, device: str = "cpu"):
        self.spec = spec
        self.fn = fn
        self.device = device
        self.name = function_name(fn)


    def _call(self, check: str, point: int, tensors: list, output_shape: tuple):
        try:
            output = self.fn(*tensors)
        except Exception as exc:  # noqa: BLE001 - the user's code failing is a finding, not our crash
            if _unsupported(exc):
                raise ModeUnsupported(f"{self.name}: {exc}") from None
            raise CodeFailure(check, point, f"{self.name} raised {_describe(exc)}") from None
        if not isinstance(output, torch.Tensor):
            raise CodeFailure(check, point, f"{self.name} returned {type(output).__name__}, not a tensor")
        if tuple(output.shape) != tuple(output_shape):
            raise CodeFailure(check, point, f"{self.name} returned shape {tuple(output.shape)}; "
                                            f"the spec's output has shape {tuple(output_shape)}")
        return output

    def _grad(self, check, point, outputs, wrt, seeds, create_graph=False):
        try:
            return torch.autograd.grad(outputs, wrt, seeds, allow_unused=True, create_graph=create_graph)
        except Exception as exc:  # noqa: BLE001 - a failing backward is a finding
            if _unsupported(exc):
                raise ModeUnsupported(f"{self.name}: {exc}", mode="rev") from None
            raise CodeFailure(check, point, f"the backward of {self.name} raised {_describe(exc)}") from None

    def _gradients(self, check, point, output, leaves: dict, seed, create_graph=False) -> dict:
        """The inputs' gradients at one point, each checked for its shape."""
        if not output.requires_grad:
            return dict.fromkeys(leaves)
        grads = dict(zip(leaves, self._grad(check, point, output, list(leaves.values()), seed, create_graph)))
        for name, grad in grads.items():
            if grad is not None and grad.shape != leaves[name].shape:
                raise CodeFailure(check, point, f"the gradient of {name} has shape {tuple(grad.shape)}; "
                                                f"{name} has shape {tuple(leaves[name].shape)}")
        return grads

    def reverse(self, at, value_shapes: dict, gradient_shapes: dict, dtype) -> tuple:
        output_name = self.spec.output
        output_shape = value_shapes[output_name]
        values, gradients = [], {name: [] for name in self.spec.inputs if differentiated(self.spec, name)}
        for point in range(at.batch):
            leaves = {name: self._input(name, array[point], dtype, True) for name, array in at.inputs.items()}
            output = self._call("value", point, list(leaves.values()), output_shape)
            values.append(_array(output, output_shape))
            if not gradient_shapes:
                continue
            grads = self._gradients("gradient", point, output, _differentiated_leaves(self.spec, leaves),
                                    self._tensor(at.cotangent[point], dtype))
            for name, grad in grads.items():
                gradients[name].append(_array(grad, leaves[name].shape))
        grad_fns = dict.fromkeys(gradients, self.name)
        return {output_name: np.stack(values)}, {n: np.stack(g) for n, g in gradients.items() if g}, grad_fns

    def forward(self, at, dtype) -> np.ndarray:
        output_shape = at.cotangent.shape[1:]
        results = []
        for point in range(at.batch):
            with forward_ad.dual_level():
                duals = [_dual(self.spec, name, self._input(name, array[point], dtype),
                               self._tensor(at.tangents[name][point], dtype))
                         for name, array in at.inputs.items()]
                output = self._call("JVP", point, duals, output_shape)
                results.append(_array(forward_ad.unpack_dual(output).tangent, output_shape))
        return np.stack(results)

    def second(self, at, dtype, over_forward: bool) -> dict:
        output_shape = at.cotangent.shape[1:]
        results = {name: [] for name in at.inputs if differentiated(self.spec, name)}
        for point in range(at.batch):
            seed = self._tensor(at.cotangent[point], dtype)
            tangents = {name: self._tensor(t[point], dtype) for name, t in at.tangents.items()}
            if over_forward:
                with forward_ad.dual_level():
                    leaves = {name: _dual(self.spec, name, self._input(name, array[point], dtype, True), tangents[name])
                              for name, array in at.inputs.items()}
                    output = self._call("HVP", point, list(leaves.values()), output_shape)
                    grads = self._gradients("HVP", point, output, _differentiated_leaves(self.spec, leaves), seed)
                    products = {name: None if g is None else forward_ad.unpack_dual(g).tangent
                                for name, g in grads.items()}
            else:
                leaves = {name: self._input(name, array[point], dtype, True) for name, array in at.inputs.items()}
                output = self._call("HVP", point, list(leaves.values()), output_shape)
                wrt = _differentiated_leaves(self.spec, leaves)
                grads = self._gradients("HVP", point, output, wrt, seed, create_graph=True)
                products = _products(grads, wrt, tangents,
                                     lambda outputs, wrt, seeds, allow_unused, point=point:
                                     self._grad("HVP", point, outputs, wrt, seeds))
            for name, product in products.items():
                results[name].append(_array(product, at.inputs[name].shape[1:]))
        return {name: np.stack(r) for name, r in results.items()}


def function_name(fn) -> str:
    """How the user refers to ``fn``: ``Tanh.apply`` for a custom Function (whose apply's
    qualified name is Function.apply), else its qualified name."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__name__}.{fn.__name__}"
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _describe(exc: Exception) -> str:
    """The exception and the innermost frame of the user's code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    own = [f for f in frames if not f.filename.startswith(inside)]
    frame = (own or frames or [None])[-1]
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
