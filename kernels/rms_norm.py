"""RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), normalized in fp32 (fp64 stays fp64), scaled in x's dtype.

rms_norm(x [..., H], weight [H], eps, impl) -> [..., H] in promote(x.dtype, weight.dtype)

impl="torch" is the reference: the HF reference's ops (same bits), keeping only x and the [..., 1]
rsqrt, with the closed-form backward
    grad_x = rstd * (g - x * rstd^2 * mean(g * x)),  g = grad * weight (fp32)
written into two buffers instead of autograd's about seven of x's size.
impl="triton": one kernel per pass, one program per row (the reference takes ~8 launches forward,
~10 backward, with a bf16 <-> fp32 cast of x each way); the weight's gradient is summed per
program over its rows in fp32, then over the programs.
"""

import torch
from torch import Tensor

from moonlight.dtypes import at_least_fp32

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton only impl="torch" is available
    triton = None


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = at_least_fp32(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        y = (x32 * rstd).to(x.dtype)
        # in place in eager only: compiled graphs functionalize it anyway, and torch 2.11's dynamo gives an
        # output its forward changed in place a zero gradient (pytorch/pytorch#180642)
        in_place = not torch.compiler.is_compiling() and y.dtype == torch.promote_types(y.dtype, weight.dtype)
        return y.mul_(weight) if in_place else weight * y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = at_least_fp32(x)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (x32 * rstd).to(x.dtype).mul_(grad).sum_to_size(weight.shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = at_least_fp32(grad * weight)
            coeff = (g * x32).mean(-1, keepdim=True).mul_(rstd.pow(2)).neg_()
            grad_x = g.addcmul_(x32, coeff).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, x_stride, eps, H: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        in_row = cols < H
        x = tl.load(x_ptr + row * x_stride + cols, mask=in_row, other=0.0)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / H + eps)
        tl.store(rstd_ptr + row, rstd)
        y = (x32 * rstd).to(x.dtype)  # rounded to the input dtype before the scale, as the reference
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0)
        tl.store(
            out_ptr + row * H + cols, (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=in_row
        )

    @triton.jit
    def _rms_norm_bwd_kernel(
        grad_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        grad_x_ptr,
        grad_w_ptr,
        num_rows,
        x_stride,
        H: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GRAD_X: tl.constexpr,
        GRAD_W: tl.constexpr,
    ):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        in_row = cols < H
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0)
        grad_w = tl.zeros([BLOCK_H], dtype=tl.float32)
        for r in range(program, num_rows, tl.num_programs(0)):
            row = r + tl.zeros([], dtype=tl.int64)  # 64-bit offsets (the interpreter hands out ints)
            grad = tl.load(grad_ptr + row * H + cols, mask=in_row, other=0.0)
            x = tl.load(x_ptr + row * x_stride + cols, mask=in_row, other=0.0)
            x32 = x.to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            if GRAD_W:  # the normalized x in x's dtype times grad, rounded to x's dtype as the reference's
                y = (x32 * rstd).to(x.dtype).to(tl.float32)
                grad_w += (y * grad.to(tl.float32)).to(x.dtype).to(tl.float32)
            if GRAD_X:
                g = (grad.to(tl.float32) * w.to(tl.float32)).to(grad.dtype).to(tl.float32)
                coeff = -(tl.sum(g * x32, axis=0) / H) * rstd * rstd
                tl.store(
                    grad_x_ptr + row * H + cols, ((g + x32 * coeff) * rstd).to(grad_x_ptr.dtype.element_ty), mask=in_row
                )
        if GRAD_W:
            tl.store(grad_w_ptr + program * H + cols, grad_w, mask=in_row)


def _block_h(hidden: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(hidden)
    return block_h, max(1, min(16, block_h // 256))


@torch.library.custom_op("moonlight::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    rows = x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        block_h, num_warps = _block_h(x.shape[-1])
        _rms_norm_fwd_kernel[(rows.shape[0],)](
            rows, weight, out, rstd, rows.stride(0), eps, H=x.shape[-1], BLOCK_H=block_h, num_warps=num_warps
        )
    return out, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return (
        torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.custom_op("moonlight::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_x: bool, grad_w: bool
) -> tuple[Tensor, Tensor]:
    rows = x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])
    hidden, num_rows = x.shape[-1], rows.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad_x else x.new_empty(0)
    # one fp32 partial row of the weight's gradient per program: about 4 rows a program on a GPU
    programs = max(1, min(num_rows, 1024))
    partial = torch.empty(programs, hidden, dtype=torch.float32, device=x.device) if grad_w else x.new_empty(0)
    if num_rows:
        block_h, num_warps = _block_h(hidden)
        _rms_norm_bwd_kernel[(programs,)](
            grad.contiguous(),
            rows,
            weight,
            rstd,
            dx,
            partial,
            num_rows,
            rows.stride(0),
            H=hidden,
            BLOCK_H=block_h,
            GRAD_X=grad_x,
            GRAD_W=grad_w,
            num_warps=num_warps,
        )
    if not grad_w:
        return dx, torch.empty_like(weight)  # unused
    return dx, partial.sum(0).to(weight.dtype) if num_rows else torch.zeros_like(weight)


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, grad_x, grad_w):
    return torch.empty_like(x) if grad_x else x.new_empty(0), torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _rms_norm_backward(ctx, grad, _):
    x, weight, rstd = ctx.saved_tensors
    needs_x, needs_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = torch.ops.moonlight.rms_norm_backward(grad, x, weight, rstd, needs_x, needs_w)
    return grad_x if needs_x else None, grad_w if needs_w else None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float, impl: str = "torch") -> Tensor:
    """See the module docstring."""
    if impl == "torch":
        return _RMSNormFunction.apply(x, weight, eps)
    if impl == "triton":
        return torch.ops.moonlight.rms_norm(x, weight, eps)[0]
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
