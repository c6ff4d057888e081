"""The experts' grouped GEMM as one opaque op: out[r] = x[r] @ w[e] for the rows r of group e.

grouped_mm(x [N, K], w [E, K, M], offs [E] int32) -> [N, M], offs the cumulative group sizes
(offs[-1] == N: rows past the last group would be left uninitialized).

It wraps `torch._grouped_mm` (bf16 on GPUs, fp32/bf16 on CPUs) in a custom op so that torch.compile
treats it as a black box: the stock fake kernel only accepts bf16, so an fp32 grouped GEMM would
otherwise break the graph. The backward is two more grouped GEMMs:
  grad_x = grouped_mm(grad, w^T)    grad_w[e] = x[group e]^T @ grad[group e]  (2-D x 2-D, offs on N)
(grad_w made transposed, as grad[group e]^T @ x[group e], when w is a transposed view).
"""

import torch
from torch import Tensor


@torch.library.custom_op("moonlight::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(x, w, offs=offs).contiguous()  # CUDA pads rows to 16 bytes when M is odd


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moonlight::grouped_mm_weight_grad", mutates_args=())
def _weight_grad(x: Tensor, grad_out: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(x.t(), grad_out, offs=offs).contiguous()


@_weight_grad.register_fake
def _(x, grad_out, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad_out.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1] and w.transpose(-2, -1).is_contiguous():
        # w is the transpose of a stored [E, M, K] weight (as the experts pass theirs): make the gradient
        # in that layout, else autograd copies it into the parameter's strides
        grad_w = _weight_grad(grad, x, offs).transpose(-2, -1)
    elif ctx.needs_input_grad[1]:
        grad_w = _weight_grad(x, grad, offs)
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
