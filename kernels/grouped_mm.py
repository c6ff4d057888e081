"""The routed experts' grouped GEMM as one opaque op, so torch.compile traces around it.

grouped_linear(x [N, in], weight [E, out, in], offs [E] int32 cumulative row ends) -> [N, out]:
rows offs[e-1]:offs[e] of x go through F.linear with weight[e]. It runs torch._grouped_mm, whose
fake (meta) kernel asserts bf16 inputs, so fp32 on CPU could not be compiled; as a custom op with
its own fake implementation the graph only needs the output shape. The backward is a custom op too
(its formulas run in the compiled backward graph otherwise). `grouped_linear_reference` is the
per-expert loop it must equal.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_linear_reference(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
    return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(x.split(sizes))])


@torch.library.custom_op("moonlight::grouped_linear", mutates_args=())
def _grouped_linear_op(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)


@_grouped_linear_op.register_fake
def _(x, weight, offs):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("moonlight::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    grad_x = torch._grouped_mm(grad, weight, offs=offs)
    grad_weight = torch._grouped_mm(grad.t(), x, offs=offs)  # [E, out, in]: one outer product per group
    return grad_x, grad_weight


@_grouped_linear_backward_op.register_fake
def _(grad, x, weight, offs):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, offs = inputs
    ctx.save_for_backward(x, weight, offs)


def _backward(ctx, grad):
    x, weight, offs = ctx.saved_tensors
    grad_x, grad_weight = _grouped_linear_backward_op(grad.contiguous(), x, weight, offs)
    return grad_x, grad_weight, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """F.linear of each contiguous row group of x with its expert's weight (see the module docstring)."""
    return _grouped_linear_op(x, weight, offs)
