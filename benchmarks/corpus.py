"""Custom autograd Functions, correct and deliberately broken, each with the spec of its math.

Used by ``benchmarks/detection.py`` (verify against gradcheck) and by the tests. Each broken
Function has one bug of a class people write: a wrong formula, a sign error, an ignored grad_output, a wrong
branch above a threshold, an approximate backward, NaN from overflow where the derivative is
finite, a transposed weight gradient, a backward that cuts the graph for second order; and, in
the regimes where a tolerance could excuse them, a saturated backward, a stable op's backward
recomputed naively, a cancelling backward, small values flushed to zero and a comparison that
errs at a tie. Their specs are written the way users write them (``log(sum(exp(x)))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    spec: str
    fn: object
    bug: str = ""  # the class of bug planted; "" for a correct Function
    inputs: tuple = ((5,),)  # shapes of gradcheck's random inputs


class Tanh(torch.autograd.Function):
    """Reverse and forward mode; the backward is differentiable, so double backward works."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class TanhDetached(Tanh):
    """Correct first derivative; the backward detaches, so second order sees a constant."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g * (1 - y * y)).detach()

class TanhWithWrongBackward(Tanh):
    """The backward forgets the square: g * (1 - y) instead of g * (1 - y**2)."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)

class Sin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)


class SinSignError(Sin):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g * torch.cos(x)

class Exp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


class ExpIgnoringGradOutput(Exp):
    """The backward returns exp(x) whatever gradient flows in."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y.clone()

class Softplus(torch.autograd.Function):
    """softplus with torch's threshold: x itself above 20."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20))))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))


class SoftplusWrongBranch(Softplus):
    """Above the threshold the backward returns 0.5 instead of 1."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 20, torch.full_like(x, 0.5), torch.sigmoid(x))

class SoftplusOverflowingBackward(Softplus):
    """The backward as exp(x) / (1 + exp(x)): inf / inf = NaN once exp overflows."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        e = torch.exp(x)
        return g * e / (1 + e)

class Gelu(torch.autograd.Function):
    """gelu in its erf form, with the exact derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return g * (cdf + x * pdf)


class GeluApproximateBackward(Gelu):
    """Forward in the erf form, backward of the tanh approximation (off by up to ~1e-3)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        c = math.sqrt(2 / math.pi)
        inner = c * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))

class Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, x):
        ctx.save_for_backward(W, x)
        return W @ x

    @staticmethod
    def backward(ctx, g):
        W, x = ctx.saved_tensors
        return torch.outer(g, x), W.T @ g


class LinearTransposedWeightGradient(Linear):
    @staticmethod
    def backward(ctx, g):
        W, x = ctx.saved_tensors
        return torch.outer(x, g), W.T @ g  # the transpose of outer(g, x): same shape for square W

class LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.logsumexp(x, 0)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * torch.exp(x - y)


class SaturatedTanh(Tanh):
    """Above 20 in magnitude the backward returns 1, where the derivative is about 0."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * torch.where(y.abs() == 1, torch.ones_like(y), 1 - y * y)


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, 0)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        _, y = ctx.saved_tensors
        return y * (g - (g * y).sum())


class SoftmaxRecomputed(Softmax):
    """The backward recomputes exp(x) / sum(exp(x)): NaN once exp overflows."""

    @staticmethod
    def backward(ctx, g):
        x, _ = ctx.saved_tensors
        y = torch.exp(x) / torch.exp(x).sum()
        return y * (g - (g * y).sum())


class LogSumExpNaiveBackward(LogSumExp):
    """The backward as exp(x) / sum(exp(x)): NaN once exp overflows."""

    @staticmethod
    def backward(ctx, g):
        x, _ = ctx.saved_tensors
        return g * torch.exp(x) / torch.exp(x).sum()


class LogSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.logsigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(-x)


class LogSigmoidCancelling(LogSigmoid):
    """The backward as 1 - sigmoid(x), as a focal loss writes |label - p|: 1e-3 off at x = 30."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.sigmoid(x))


class Relu(torch.autograd.Function):
    """PyTorch's tutorial ReLU: its derivative at 0 is 1, a valid one-sided derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g.clone()
        grad[x < 0] = 0
        return grad


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class CubeFlushingSmallValues(Cube):
    """The backward flushes inputs below 0.095 in magnitude to a derivative of 0."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.where(x.abs() < 0.095, torch.zeros_like(x), 3 * x**2)


class Above(torch.autograd.Function):
    """where(x > y, x, 2y): the value and its gradient."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return torch.where(x > y, x, 2 * y)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        taken = x > y
        return g * taken, g * 2 * ~taken


class AboveOrTied(Above):
    """Compares with >= where the math says >: wrong at every tie x = y."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return torch.where(x >= y, x, 2 * y)


CASES = [
    Case("tanh", "x: Real[n]\ny = tanh(x)", Tanh.apply),
    Case("sin", "x: Real[n]\ny = sin(x)", Sin.apply),
    Case("exp", "x: Real[n]\ny = exp(x)", Exp.apply),
    Case("softplus", "x: Real[n]\ny = softplus(x)", Softplus.apply),
    Case("gelu", "x: Real[n]\ny = gelu(x)", Gelu.apply),
    Case("linear", "W: Real[n, n]\nx: Real[n]\ny = W @ x", Linear.apply, inputs=((4, 4), (4,))),
    Case("logsumexp", "x: Real[n]\ny = logsumexp(x)", LogSumExp.apply),
    Case("tanh: forgotten square", "x: Real[n]\ny = tanh(x)", TanhWithWrongBackward.apply, "wrong formula"),
    Case("sin: sign error", "x: Real[n]\ny = sin(x)", SinSignError.apply, "sign error"),
    Case("exp: ignores grad_output", "x: Real[n]\ny = exp(x)", ExpIgnoringGradOutput.apply, "ignored grad_output"),
    Case("softplus: wrong branch above 20", "x: Real[n]\ny = softplus(x)", SoftplusWrongBranch.apply,
         "wrong branch above a threshold"),
    Case("gelu: approximate backward", "x: Real[n]\ny = gelu(x)", GeluApproximateBackward.apply,
         "approximate backward"),
    Case("softplus: NaN from overflow", "x: Real[n]\ny = softplus(x)", SoftplusOverflowingBackward.apply,
         "NaN from overflow"),
    Case("linear: transposed weight gradient", "W: Real[n, n]\nx: Real[n]\ny = W @ x",
         LinearTransposedWeightGradient.apply, "transposed weight gradient", inputs=((4, 4), (4,))),
    Case("tanh: detached backward", "x: Real[n]\ny = tanh(x)", TanhDetached.apply, "detached backward"),
    Case("softmax", "x: Real[n]\ny = exp(x) / sum(exp(x))", Softmax.apply),
    Case("logsumexp, naive spec", "x: Real[n]\ny = log(sum(exp(x)))", LogSumExp.apply),
    Case("logsigmoid, naive spec", "x: Real[n]\ny = -log(1 + exp(-x))", LogSigmoid.apply),
    Case("relu: the tutorial's", "x: Real[n]\ny = where(x > 0, x, 0)", Relu.apply),
    Case("cube", "x: Real[n]\ny = x**3", Cube.apply),
    Case("where", "x: Real[n]\ny: Real[n]\no = where(x > y, x, 2 * y)", Above.apply, inputs=((5,), (5,))),
    Case("tanh: saturated backward", "x: Real[n]\ny = tanh(x)", SaturatedTanh.apply, "saturation"),
    Case("softmax: recomputed", "x: Real[n]\ny = exp(x) / sum(exp(x))", SoftmaxRecomputed.apply,
         "NaN from overflow in a stable op"),
    Case("logsumexp: naive backward", "x: Real[n]\ny = log(sum(exp(x)))", LogSumExpNaiveBackward.apply,
         "NaN from overflow in a stable op"),
    Case("logsigmoid: 1 - sigmoid", "x: Real[n]\ny = -log(1 + exp(-x))", LogSigmoidCancelling.apply,
         "cancellation"),
    Case("cube: small values flushed", "x: Real[n]\ny = x**3", CubeFlushingSmallValues.apply, "flushed small values"),
    Case("where: >= for >", "x: Real[n] = [1.5]\ny: Real[n] = [1.5]\no = where(x > y, x, 2 * y)", AboveOrTied.apply,
         "tie", inputs=((5,), (5,))),
]
