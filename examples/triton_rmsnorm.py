"""Triton RMSNorm and SiLU with hand-written backward kernels, checked by ``verify``.

The kernels are written as training kernels are: they load the storage dtype (float32,
bfloat16 or float16), compute in float32 and store each result once. ``rmsnorm_with_bug``
is the same op with a planted backward bug (dx loses the term through the row's norm), and
``rmsnorm_assuming_row_major_dy`` one whose backward reads ``dy`` as if it were contiguous.

``rmsnorm`` takes rows ``x`` of shape (..., n) and a weight ``w`` of shape (n,), shared by
the rows, or of ``x``'s shape, one per row: the kernels read ``w`` by its row stride, 0 when
it is shared. So ``check_function(..., rows=True)`` can stack many independent points, each
with its own weight, into one launch.

Without a GPU, the kernels run on the CPU through Triton's interpreter: importing this
module sets TRITON_INTERPRET=1 where CUDA is not available (Triton has no CPU backend).

    python -c "
    import torch, verify
    from examples.triton_rmsnorm import rmsnorm, SPEC
    print(verify.check_function(rmsnorm, SPEC, rows=True, dtype=torch.bfloat16,
                                compute_dtype=torch.float32, modes=('rev',)))"
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Its own jit'd functions (tl.sum) were made for a GPU: the interpreter cannot run them.
        raise ImportError("triton was imported (torch imports it during some calls) before TRITON_INTERPRET=1 was "
                          "set, and there is no GPU: set TRITON_INTERPRET=1 in the environment, or import this "
                          "module first")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # after TRITON_INTERPRET is set: triton reads it on import
import triton.language as tl

EPS = 1e-6

# One row of rmsnorm. The inputs are activations: the kernel squares them in float32, which
# overflows past about 1e19, so the spec bounds them as layer_norm.vspec does.
SPEC = """\
x: Interval(-10000, 10000)[n]
w: Interval(-10000, 10000)[n]
y = x / sqrt(mean(x**2) + 1e-6) * w
"""

# The elementwise op: any tensor.
SILU_SPEC = """\
x: Real[n]
y = x * sigmoid(x)
"""


@triton.jit
def _rmsnorm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, w_row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * w_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * w
    tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_rows_ptr, n, w_row_stride,
                             BLOCK: tl.constexpr, BUGGY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dy = tl.load(dy_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + row * w_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xhat = x * rstd
    wdy = w * dy
    if BUGGY:
        dx = rstd * wdy  # forgets that rstd depends on x
    else:
        dx = rstd * (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n))
    tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_rows_ptr + row * n + cols, xhat * dy, mask=mask)  # each row's share of dw, in float32


class RMSNorm(torch.autograd.Function):
    """RMSNorm over the last axis of ``x`` (any leading shape), scaled by ``w``: shared, of
    shape (n,), or one per row, of ``x``'s shape."""

    @staticmethod
    def forward(ctx, x, w):
        n = x.shape[-1]
        x_rows = x.reshape(-1, n).contiguous()
        rows = x_rows.shape[0]
        shared = w.dim() == 1
        w = w.contiguous()
        y = torch.empty_like(x_rows)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _rmsnorm_forward_kernel[(rows,)](x_rows, w, y, rstd, n, 0 if shared else n, EPS,
                                         BLOCK=triton.next_power_of_2(n))
        ctx.save_for_backward(x_rows, w, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        return _rmsnorm_backward(ctx, dy, buggy=False)


class _RMSNormWithBug(RMSNorm):
    @staticmethod
    def backward(ctx, dy):
        return _rmsnorm_backward(ctx, dy, buggy=True)


class _RMSNormAssumingRowMajorDy(RMSNorm):
    @staticmethod
    def backward(ctx, dy):
        return _rmsnorm_backward(ctx, dy, buggy=False, row_major_dy=True)


def _rmsnorm_backward(ctx, dy, buggy, row_major_dy=False):
    x_rows, w, rstd = ctx.saved_tensors
    rows, n = x_rows.shape
    shared = w.dim() == 1
    if row_major_dy:  # the planted layout bug: dy's memory read with row stride n, whatever its strides
        dy_rows = torch.as_strided(dy, (rows, n), (n, 1), dy.storage_offset())
    else:
        dy_rows = dy.reshape(rows, n).contiguous()
    dx = torch.empty_like(x_rows)
    dw_rows = torch.empty(rows, n, dtype=torch.float32, device=x_rows.device)
    _rmsnorm_backward_kernel[(rows,)](dy_rows, x_rows, w, rstd, dx, dw_rows, n, 0 if shared else n,
                                      BLOCK=triton.next_power_of_2(n), BUGGY=buggy)
    dw = dw_rows.sum(0) if shared else dw_rows.view(w.shape)
    return dx.view(dy.shape), dw.to(w.dtype)


rmsnorm = RMSNorm.apply
rmsnorm_with_bug = _RMSNormWithBug.apply
# The same kernels, with a backward that hands them dy as if it were contiguous (a layout bug).
rmsnorm_assuming_row_major_dy = _RMSNormAssumingRowMajorDy.apply


SILU_BLOCK = 1024


@triton.jit
def _silu_forward_kernel(x_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(x)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_backward_kernel(dy_ptr, x_ptr, dx_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    dx = dy * (s + x * s * (1.0 - s))
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class SiLU(torch.autograd.Function):
    """Elementwise x * sigmoid(x), for ``x`` of any shape."""

    @staticmethod
    def forward(ctx, x):
        x_flat = x.contiguous().view(-1)
        y = torch.empty_like(x_flat)
        grid = (triton.cdiv(x_flat.numel(), SILU_BLOCK),)
        _silu_forward_kernel[grid](x_flat, y, x_flat.numel(), BLOCK=SILU_BLOCK)
        ctx.save_for_backward(x_flat)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x_flat,) = ctx.saved_tensors
        dy_flat = dy.contiguous().view(-1)
        dx = torch.empty_like(x_flat)
        grid = (triton.cdiv(x_flat.numel(), SILU_BLOCK),)
        _silu_backward_kernel[grid](dy_flat, x_flat, dx, x_flat.numel(), BLOCK=SILU_BLOCK)
        return dx.view(dy.shape)


silu = SiLU.apply
