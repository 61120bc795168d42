"""What is under test, on the torch side: the spec's own torch lowering, or a user's function.

Both answer the same questions on a batch of points: values and vector-Jacobian products
(reverse mode), Jacobian-vector products (forward mode), and Hessian-vector products (by
double backward, and forward-over-reverse). Arrays go in and come out in float64, with a
leading batch dimension.

The spec's lowering runs the whole batch at once. A user's function takes one point's
tensors. Its values, VJPs and JVPs are computed for the whole batch by ``torch.func.vmap``
where the function supports it, and its first points are also called one by one, the eager
way, as a spot check that vmap changed nothing. Where vmap fails or the spot check differs,
it is called once per point, and its failures (an exception, a wrong shape) belong to the
point that caused them.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import traceback
import warnings

import numpy as np
import torch
from torch.autograd import forward_ad

from .ir import Spec
from .layouts import laid_out
from .lower.torch import TorchProgram
from .strategies import input_dtype
from .tolerance import UNIT_ROUNDOFF


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


# TypeError messages of a call that does not fit the function's parameters.
_ARITY = re.compile(r"missing \d+ required positional argument|takes \d+ positional argument|"
                    r"takes from \d+ to \d+ positional arguments|positional arguments? but \d+ (was|were) given")


def _takes(signature: inspect.Signature, count: int) -> bool:
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _unsupported(exc: Exception) -> bool:
    """torch's way of saying a Function has no jvp, or an op has no kernel for a dtype
    (linalg's "Low precision dtypes not supported")."""
    return isinstance(exc, NotImplementedError) or any(
        phrase in str(exc) for phrase in ("not implemented for", "dtypes not supported"))


@functools.cache
def forward_ad_loaded() -> None:
    """Load torch's forward-mode decompositions, which its first dual tensor does, warning
    that the ``torch.jit.script`` they use is deprecated: torch's notice, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
        with forward_ad.dual_level():
            forward_ad.make_dual(torch.zeros(1), torch.zeros(1))


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
        forward_ad_loaded()
        with forward_ad.dual_level():
            duals = {name: _dual(self.spec, name, self._input(name, array, dtype), self._tensor(at.tangents[name], dtype))
                     for name, array in at.inputs.items()}
            output = _as_tensor(self._run(duals, at.sizes, dtype)[self.spec.output], dtype)
            tangent = forward_ad.unpack_dual(output).tangent
        return _array(tangent, at.cotangent.shape)

    def second(self, at, dtype, over_forward: bool) -> dict:
        """Hessian-vector products per input: by double backward, or by forward over reverse."""
        forward_ad_loaded()
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
    returning the output; only the output's value and the inputs' derivatives are seen.

    With ``rows``, the function takes every input with a leading axis of independent points
    (a row-wise kernel) and returns the output with it: many points go in one call."""

    def __init__(self, spec: Spec, fn, device: str = "cpu", rows: bool = False):
        self.spec = spec
        self.fn = fn
        self.device = device
        self.rows = rows
        self.name = function_name(fn)
        self.routes = {}  # "values and VJPs" or "JVPs" -> how the function was called for them
        self.stacked_apart = {}  # the same kinds -> how stacked and single calls differed in the last batch

    def vmapped(self) -> bool:
        return VMAPPED in self.routes.values()

    def call_one_by_one(self, why: str) -> None:
        for kind in self.routes:
            self.routes[kind] = f"point by point ({why})"

    def _singles(self, at) -> list:
        """One call per point: (the point, what picks its inputs), a stack of one with ``rows``."""
        return [(point, slice(point, point + 1) if self.rows else point) for point in range(at.batch)]

    def _routed(self, kind: str, at, dtype, calls, vmapped) -> dict:
        """``kind``'s arrays on ``at`` (name -> batch-leading array) from ``calls(at, picks)``:
        the whole batch in one call (``vmapped(at)``, or stacked with ``rows``) with a spot
        check of its first points called one by one, or one point at a time where the batched
        call failed or, under vmap, the spot check differed."""
        if self.rows:
            batched, route = (lambda part: calls(part, [(0, slice(None))])), STACKED
        else:
            batched, route = vmapped, VMAPPED
        self.stacked_apart.pop(kind, None)
        if at.batch <= SPOT_POINTS or self.routes.get(kind, route) != route:
            return calls(at, self._singles(at))
        try:
            together = batched(at)
        except Exception as exc:  # noqa: BLE001 - unsupported, or the code fails at a point: one by one tells
            arrays = calls(at, self._singles(at))
            caller = "the stacked call" if self.rows else "torch.func.vmap"
            self.routes[kind] = f"point by point ({caller} raised {_first_line(exc)})"
            return arrays
        spot = np.arange(at.batch) < SPOT_POINTS
        single = calls(at.at(spot), self._singles(at.at(spot)))
        differing = _first_difference(single, together, dtype)
        if differing is not None and self.rows:
            # Another order of summation stacked can differ by more than a few roundings where
            # the result cancels: the stacked results, as the kernel runs in training, are judged.
            name, point = differing
            self.stacked_apart[kind] = (f"rows: called with the points stacked, {self.name} gave another {name} at "
                                        f"point {point} than called with it alone (a stack of one, as the snippet "
                                        "calls it); the stacked results were judged. If the snippet passes, the "
                                        "rows are not independent")
            return together
        if differing is not None:
            self.routes[kind] = "point by point (the vmapped results differed from calls one by one)"
            rest = calls(at.at(~spot), self._singles(at.at(~spot)))
            return {name: np.concatenate([array, rest[name]]) for name, array in single.items()}
        self.routes[kind] = route
        return {name: np.concatenate([array, together[name][SPOT_POINTS:]]) for name, array in single.items()}

    def _batched_inputs(self, at, dtype) -> tuple:
        """(the inputs' batched tensors, the positions of the differentiated ones)."""
        names = list(at.inputs)
        tensors = [self._input(name, at.inputs[name], dtype) for name in names]
        return tensors, [k for k, name in enumerate(names) if differentiated(self.spec, name)]

    def _of_differentiated(self, point: tuple, positions: list):
        """The function of the differentiated inputs, the others held at ``point``'s."""
        def call(*inputs):
            arguments = list(point)
            for position, tensor in zip(positions, inputs):
                arguments[position] = tensor
            return self.fn(*arguments)
        return call

    def probe(self, at, dtype, modes) -> None:
        """Call the function once at ``at`` (one point) before any drawing: a ``TypeError`` where
        it cannot take the spec's inputs, ``ModeUnsupported`` where a mode asked for is not
        implemented. What else it raises there is left to the checks, which report it at a
        drawn point."""
        names = list(self.spec.inputs)
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            signature = None  # a builtin: the call tells
        if signature is not None and not _takes(signature, len(names)):
            raise TypeError(f"{self.name}{signature} cannot take the spec's {len(names)} input(s) "
                            f"({', '.join(names)}): check_function calls it with one tensor per input, in the order "
                            "the spec declares them") from None
        pick = slice(0, 1) if self.rows else 0
        leaves = [self._input(name, array[pick], dtype, True) for name, array in at.inputs.items()]
        try:
            output = self.fn(*leaves)
        except Exception as exc:  # noqa: BLE001 - the code failing at a point is the checks' to report
            if isinstance(exc, TypeError) and _ARITY.search(str(exc)):
                raise TypeError(f"{self.name} cannot be called with the spec's inputs ({', '.join(names)}), one "
                                f"tensor each in declaration order: {exc}") from None
            return
        if "rev" in modes and isinstance(output, torch.Tensor) and output.requires_grad:
            try:
                output.sum().backward()
            except Exception as exc:  # noqa: BLE001 - as above
                if _unsupported(exc):
                    raise ModeUnsupported(f"{self.name}: {_first_line(exc)}", mode="rev") from None
        if "fwd" in modes:
            forward_ad_loaded()
            try:
                with forward_ad.dual_level():
                    self.fn(*[_dual(self.spec, name, leaf.detach(), torch.ones_like(leaf))
                              for name, leaf in zip(names, leaves)])
            except Exception as exc:  # noqa: BLE001 - as above
                if _unsupported(exc):
                    raise ModeUnsupported(f"{self.name}: {_first_line(exc)}", mode="fwd") from None

    def _checked_batch_output(self, output, at, output_shape):
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != (at.batch, *output_shape):
            raise ValueError("the vmapped output has another shape")  # one by one names the point

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
            stacked = " for the points stacked" if self.rows else ""
            raise CodeFailure(check, point, f"{self.name} returned shape {tuple(output.shape)}; the spec's output"
                                            f"{stacked} has shape {tuple(output_shape)}")
        return output

    def _grad(self, check, point, outputs, wrt, seeds, create_graph=False):
        try:
            return torch.autograd.grad(outputs, wrt, seeds, allow_unused=True, create_graph=create_graph)
        except Exception as exc:  # noqa: BLE001 - a failing backward is a finding
            if _unsupported(exc):
                raise ModeUnsupported(f"{self.name}: {exc}", mode="rev") from None
            raise CodeFailure(check, point, f"the backward of {self.name} raised {_describe(exc)}") from None

    def _gradients(self, check, point, output, leaves: dict, seed, create_graph=False) -> dict:
        """The inputs' gradients at one call, each checked for its shape."""
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
        with_gradients = bool(gradient_shapes)
        arrays = self._routed("values and VJPs", at, dtype,
                              lambda part, picks: self._reverse_calls(part, picks, output_shape, with_gradients, dtype),
                              lambda part: self._reverse_vmapped(part, output_shape, with_gradients, dtype))
        values = {output_name: arrays.pop(output_name)}
        return values, arrays, dict.fromkeys(arrays, self.name)

    def _reverse_calls(self, at, picks: list, output_shape, with_gradients: bool, dtype) -> dict:
        """Values and VJPs from one call per pick: (the point an error is blamed on, its index
        into the batch: a point's, or a slice of stacked points)."""
        output_name = self.spec.output
        values, gradients = [], {name: [] for name in self.spec.inputs if differentiated(self.spec, name)}
        for point, pick in picks:
            leaves = {name: self._input(name, array[pick], dtype, True) for name, array in at.inputs.items()}
            handed = [laid_out(leaf, at.layout) for leaf in leaves.values()]
            output = self._call("value", point, handed, _leading(at, pick) + output_shape)
            values.append(_rows(output, at, pick, output_shape))
            if not with_gradients:
                continue
            grads = self._gradients("gradient", point, output, _differentiated_leaves(self.spec, leaves),
                                    laid_out(self._tensor(at.cotangent[pick], dtype), at.layout, True, self.rows))
            for name, grad in grads.items():
                gradients[name].append(_rows(grad, at, pick, at.inputs[name].shape[1:]))
        return {output_name: np.concatenate(values),
                **{n: np.concatenate(g) for n, g in gradients.items() if g}}

    def _reverse_vmapped(self, at, output_shape, with_gradients: bool, dtype) -> dict:
        tensors, positions = self._batched_inputs(at, dtype)

        def at_a_point(cotangent, *point):
            output, pullback = torch.func.vjp(self._of_differentiated(point, positions),
                                              *[point[k] for k in positions])
            return (output, *pullback(cotangent)) if with_gradients else (output,)

        output, *gradients = torch.func.vmap(at_a_point)(self._tensor(at.cotangent, dtype), *tensors)
        self._checked_batch_output(output, at, output_shape)
        names = list(at.inputs)
        arrays = {self.spec.output: _array(output, output.shape)}
        for position, gradient in zip(positions, gradients):
            arrays[names[position]] = _array(gradient, at.inputs[names[position]].shape)
        return arrays

    def forward(self, at, dtype) -> np.ndarray:
        forward_ad_loaded()
        return self._routed("JVPs", at, dtype, lambda part, picks: self._forward_calls(part, picks, dtype),
                            lambda part: self._forward_vmapped(part, dtype))["JVP"]

    def _forward_calls(self, at, picks: list, dtype) -> dict:
        output_shape = at.cotangent.shape[1:]
        results = []
        for point, pick in picks:
            with forward_ad.dual_level():
                duals = [laid_out(_dual(self.spec, name, self._input(name, array[pick], dtype),
                                        self._tensor(at.tangents[name][pick], dtype)), at.layout)
                         for name, array in at.inputs.items()]
                output = self._call("JVP", point, duals, _leading(at, pick) + output_shape)
                results.append(_rows(forward_ad.unpack_dual(output).tangent, at, pick, output_shape))
        return {"JVP": np.concatenate(results)}

    def _forward_vmapped(self, at, dtype) -> dict:
        tensors, positions = self._batched_inputs(at, dtype)
        names = list(at.inputs)
        tangents = [self._tensor(at.tangents[names[k]], dtype) for k in positions]

        def at_a_point(point, tangents):
            _, tangent = torch.func.jvp(self._of_differentiated(point, positions), tuple(point[k] for k in positions),
                                        tuple(tangents))
            return tangent

        tangent = torch.func.vmap(at_a_point)(tuple(tensors), tuple(tangents))
        self._checked_batch_output(tangent, at, at.cotangent.shape[1:])
        return {"JVP": _array(tangent, at.cotangent.shape)}

    def second(self, at, dtype, over_forward: bool) -> dict:
        """Hessian-vector products, one call per point; with ``rows``, one call on the stack
        (point by point where it raises, to name the point)."""
        forward_ad_loaded()
        if self.rows and at.batch > 1:
            try:
                return self._second_calls(at, [(0, slice(None))], dtype, over_forward)
            except CodeFailure:
                pass
        return self._second_calls(at, self._singles(at), dtype, over_forward)

    def _second_calls(self, at, picks: list, dtype, over_forward: bool) -> dict:
        output_shape = at.cotangent.shape[1:]
        results = {name: [] for name in at.inputs if differentiated(self.spec, name)}
        for point, pick in picks:
            seed = self._tensor(at.cotangent[pick], dtype)
            tangents = {name: self._tensor(t[pick], dtype) for name, t in at.tangents.items()}
            shape = _leading(at, pick) + output_shape
            if over_forward:
                with forward_ad.dual_level():
                    leaves = {name: _dual(self.spec, name, self._input(name, array[pick], dtype, True), tangents[name])
                              for name, array in at.inputs.items()}
                    output = self._call("HVP", point, list(leaves.values()), shape)
                    grads = self._gradients("HVP", point, output, _differentiated_leaves(self.spec, leaves), seed)
                    products = {name: None if g is None else forward_ad.unpack_dual(g).tangent
                                for name, g in grads.items()}
            else:
                leaves = {name: self._input(name, array[pick], dtype, True) for name, array in at.inputs.items()}
                output = self._call("HVP", point, list(leaves.values()), shape)
                wrt = _differentiated_leaves(self.spec, leaves)
                grads = self._gradients("HVP", point, output, wrt, seed, create_graph=True)
                products = _products(grads, wrt, tangents,
                                     lambda outputs, wrt, seeds, allow_unused, point=point:
                                     self._grad("HVP", point, outputs, wrt, seeds))
            for name, product in products.items():
                results[name].append(_rows(product, at, pick, at.inputs[name].shape[1:]))
        return {name: np.concatenate(r) for name, r in results.items()}


def _leading(at, pick) -> tuple:
    """The leading axis of a call's tensors: none for one point, the stack's for a slice."""
    return () if isinstance(pick, int) else (len(range(at.batch)[pick]),)


def _rows(tensor, at, pick, shape) -> np.ndarray:
    """A call's result as batch-leading rows."""
    return _array(tensor, _leading(at, pick) + tuple(shape)).reshape(-1, *shape)


# Points of each batched call that are also called one by one, and whose eager results are the ones checked.
SPOT_POINTS = 2
VMAPPED = "batched by torch.func.vmap"
STACKED = "the points stacked in rows, one call per batch"


def _first_difference(single: dict, batched: dict, dtype) -> tuple | None:
    """(the result, the point) where the calls one by one and the batched call first differ
    by more than a few roundings of ``dtype`` (a batched kernel may sum in another order), or
    None. Either is judged against the reference all the same; where both overflowed, whether
    that was right is the reference's call, so inf and nan do not differ here."""
    tolerance = 64 * UNIT_ROUNDOFF[dtype]
    for name, eager in single.items():
        together = batched[name][:len(eager)]
        scale = np.max(np.abs(eager[np.isfinite(eager)]), initial=0.0)
        close = np.isclose(together, eager, rtol=tolerance, atol=tolerance * scale)
        close |= ~np.isfinite(together) & ~np.isfinite(eager)  # inf or nan alike: an overflow, judged exactly later
        if not close.all():
            return name, int(np.flatnonzero(~close.reshape(len(eager), -1).all(axis=1))[0])
    return None


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def function_name(fn) -> str:
    """How the user refers to ``fn``: ``Tanh.apply`` for a custom Function (whose apply's
    qualified name is Function.apply), else its qualified name."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__name__}.{fn.__name__}"
    qualified = getattr(fn, "__qualname__", None) or type(fn).__name__
    return qualified.replace("_VariableFunctionsClass.", "torch.")  # torch.tanh is a method of that class


def _describe(exc: Exception) -> str:
    """The exception and the innermost frame of the user's code that raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    own = [f for f in frames if not f.filename.startswith(inside)]
    frame = (own or frames or [None])[-1]
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
