"""MoE token permutation: group (token, choice) rows by expert, and the weighted combine back.

permute_tokens   x [T, H] -> permuted [N, H], expert-major, each group optionally padded to `align`
                 (N is static: T*K, or an upper bound with padding, so nothing syncs with the host)
unpermute_tokens y [N, H] -> out [T, H], out[t] = sum_k weights[t, k] * y[row_index[t*K + k]]

The index bookkeeping stays in torch; the Triton kernels move the H-wide rows in one pass each,
without atomics: `expand` (permute forward, unpermute backward) and `combine` (unpermute forward,
permute backward). Details: docs/moe.md.
"""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton only impl="torch" is available
    triton = None


def count_tokens(expert_ids: Tensor, num_experts: int) -> Tensor:
    """expert_ids [T, K] -> the choices of each expert [num_experts] int64 (a histogram)."""
    flat = expert_ids.reshape(-1).long()
    # scatter_add instead of bincount: a fixed output shape, so no host sync (bincount reads the max);
    # its ones are one element broadcast (a view), not a [T*K] tensor written to memory
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, flat.new_ones(()).expand_as(flat))


def _route_rows(
    expert_ids: Tensor, num_experts: int, align: int, counts: Tensor | None
) -> tuple[Tensor, Tensor, int, Tensor]:
    """(row_index [T*K], padded group sizes [E], N, slot of each of the first T*K rows in expert-major
    order) from one stable sort and the histogram `counts` (made here when None)."""
    flat = expert_ids.reshape(-1).long()
    counts = count_tokens(expert_ids, num_experts) if counts is None else counts
    sorted_experts, order = flat.sort(stable=True)  # order[i]: the slot at expert-major position i
    rows = torch.arange(flat.numel(), device=flat.device)
    if align == 1:
        return torch.empty_like(rows).scatter_(0, order, rows), counts, flat.numel(), order
    group_sizes = (counts + align - 1) // align * align
    padding_before = (group_sizes - counts).cumsum(0) - (group_sizes - counts)  # rows of padding ahead of e
    row_index = torch.empty_like(rows).scatter_(0, order, rows + padding_before[sorted_experts])
    # N from the shapes alone (reading the padded sizes back would be a host sync): the upper bound
    # T*K + E*(align-1), rounded to align; the last group takes the rows left over as more padding.
    num_rows = (flat.numel() + num_experts * (align - 1) + align - 1) // align * align
    group_sizes[-1] += num_rows - group_sizes.sum()
    return row_index, group_sizes, num_rows, order


# ---------------------------------------------------------------- PyTorch reference


class _GatherTokens(torch.autograd.Function):
    """Unpadded permute: permuted[i] = x[order[i] // K], one gather. Its backward is the reference's:
    grad_x[t] = sum_k grad[row_index[t*K + k]] in k order (a gather and a sum, no atomics)."""

    @staticmethod
    def forward(ctx, x, order, row_index, top_k):
        ctx.save_for_backward(row_index)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (row_index,) = ctx.saved_tensors
        picked = grad.index_select(0, row_index)
        return picked.view(-1, ctx.top_k, grad.shape[1]).sum(1), None, None, None


def _permute_torch(x: Tensor, row_index: Tensor, num_rows: int, order: Tensor, top_k: int) -> Tensor:
    if num_rows == row_index.numel():  # no padding rows
        return _GatherTokens.apply(x, order, row_index, top_k)
    return x.new_zeros(num_rows, x.shape[1]).index_copy(0, row_index, x.repeat_interleave(top_k, dim=0))


def _unpermute_torch(y: Tensor, row_index: Tensor, weights: Tensor) -> Tensor:
    compute_dtype = torch.promote_types(y.dtype, torch.float32)
    picked = y.index_select(0, row_index).view(*weights.shape, y.shape[1]).to(compute_dtype)
    # [T, 1, K] @ [T, K, H]: the weighted sum (and both its gradients) in one pass, no [T, K, H] product
    return torch.bmm(weights.to(compute_dtype).unsqueeze(1), picked).squeeze(1).to(y.dtype)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _expand_rows_kernel(
        src_ptr,
        row_index_ptr,
        weights_ptr,
        dst_ptr,
        y_ptr,
        grad_weights_ptr,
        H: tl.constexpr,
        TOP_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        WEIGHT_GRAD: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        row = tl.load(row_index_ptr + slot)
        token = slot // TOP_K
        scale = 1.0
        if HAS_WEIGHTS:
            scale = tl.load(weights_ptr + slot).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in tl.static_range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            in_row = cols < H
            vals = tl.load(src_ptr + token * H + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(dst_ptr + row * H + cols, (vals * scale).to(dst_ptr.dtype.element_ty), mask=in_row)
            if WEIGHT_GRAD:
                dot += vals * tl.load(y_ptr + row * H + cols, mask=in_row, other=0.0).to(tl.float32)
        if WEIGHT_GRAD:
            tl.store(grad_weights_ptr + slot, tl.sum(dot, axis=0))

    @triton.jit
    def _combine_rows_kernel(
        src_ptr,
        row_index_ptr,
        weights_ptr,
        dst_ptr,
        H: tl.constexpr,
        TOP_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        for h0 in tl.static_range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            in_row = cols < H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for k in tl.static_range(TOP_K):  # one contiguous row at a time, summed in k order
                row = tl.load(row_index_ptr + token * TOP_K + k)
                vals = tl.load(src_ptr + row * H + cols, mask=in_row, other=0.0).to(tl.float32)
                if HAS_WEIGHTS:
                    vals = vals * tl.load(weights_ptr + token * TOP_K + k).to(tl.float32)
                acc += vals
            tl.store(dst_ptr + token * H + cols, acc.to(dst_ptr.dtype.element_ty), mask=in_row)


def _launch_shape(hidden: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): a whole row per block up to 4096 columns, 8 columns per thread or more."""
    block_h = min(triton.next_power_of_2(hidden), 4096)
    return block_h, max(1, min(8, block_h // 256))


def _expand_rows(
    src: Tensor, row_index: Tensor, num_rows: int, weights: Tensor | None = None, y: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """dst [num_rows, H] (and grad_weights [T*K] fp32 when y is given); see the module docstring."""
    src = src.contiguous()
    num_tokens, hidden = src.shape
    slots = row_index.numel()
    # every row is written once by its slot; only padding rows (align > 1) need zeros beforehand
    dst = src.new_empty(num_rows, hidden) if num_rows == slots else src.new_zeros(num_rows, hidden)
    grad_weights = torch.empty(slots, dtype=torch.float32, device=src.device) if y is not None else None
    if slots == 0:  # an expert-parallel rank can receive no rows: nothing to launch
        return dst, grad_weights
    block_h, num_warps = _launch_shape(hidden)
    _expand_rows_kernel[(slots,)](
        src,
        row_index,
        weights.contiguous() if weights is not None else src,  # unused pointers get a placeholder
        dst,
        y.contiguous() if y is not None else src,
        grad_weights if y is not None else src,
        H=hidden,
        TOP_K=slots // num_tokens,
        BLOCK_H=block_h,
        HAS_WEIGHTS=weights is not None,
        WEIGHT_GRAD=y is not None,
        num_warps=num_warps,
    )
    return dst, grad_weights


def _combine_rows(src: Tensor, row_index: Tensor, num_tokens: int, weights: Tensor | None = None) -> Tensor:
    """dst [num_tokens, H]; see the module docstring."""
    src = src.contiguous()
    hidden = src.shape[1]
    dst = src.new_empty(num_tokens, hidden)
    if num_tokens == 0:
        return dst
    block_h, num_warps = _launch_shape(hidden)
    _combine_rows_kernel[(num_tokens,)](
        src,
        row_index,
        weights.contiguous() if weights is not None else src,
        dst,
        H=hidden,
        TOP_K=row_index.numel() // num_tokens,
        BLOCK_H=block_h,
        HAS_WEIGHTS=weights is not None,
        num_warps=num_warps,
    )
    return dst


# ---------------------------------------------------------------- custom ops (autograd + torch.compile)


@torch.library.custom_op("moonlight::moe_permute", mutates_args=())
def _permute_op(x: Tensor, row_index: Tensor, num_rows: int) -> Tensor:
    return _expand_rows(x, row_index, num_rows)[0]


@_permute_op.register_fake
def _(x, row_index, num_rows):
    return x.new_empty(num_rows, x.shape[1])


@torch.library.custom_op("moonlight::moe_permute_backward", mutates_args=())
def _permute_backward_op(grad_permuted: Tensor, row_index: Tensor, num_tokens: int) -> Tensor:
    return _combine_rows(grad_permuted, row_index, num_tokens)


@_permute_backward_op.register_fake
def _(grad_permuted, row_index, num_tokens):
    return grad_permuted.new_empty(num_tokens, grad_permuted.shape[1])


def _permute_setup_context(ctx, inputs, output):
    x, row_index, _ = inputs
    ctx.save_for_backward(row_index)
    ctx.num_tokens = x.shape[0]


def _permute_backward(ctx, grad_permuted):
    (row_index,) = ctx.saved_tensors
    return torch.ops.moonlight.moe_permute_backward(grad_permuted, row_index, ctx.num_tokens), None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("moonlight::moe_unpermute", mutates_args=())
def _unpermute_op(y: Tensor, row_index: Tensor, weights: Tensor) -> Tensor:
    return _combine_rows(y, row_index, weights.shape[0], weights)


@_unpermute_op.register_fake
def _(y, row_index, weights):
    return y.new_empty(weights.shape[0], y.shape[1])


@torch.library.custom_op("moonlight::moe_unpermute_backward", mutates_args=())
def _unpermute_backward_op(grad_out: Tensor, y: Tensor, row_index: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    grad_y, grad_weights = _expand_rows(grad_out, row_index, y.shape[0], weights, y)
    return grad_y, grad_weights.view(weights.shape).to(weights.dtype)


@_unpermute_backward_op.register_fake
def _(grad_out, y, row_index, weights):
    return torch.empty_like(y), torch.empty_like(weights)


def _unpermute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_out):
    y, row_index, weights = ctx.saved_tensors
    grad_y, grad_weights = torch.ops.moonlight.moe_unpermute_backward(grad_out, y, row_index, weights)
    return grad_y, None, grad_weights


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


# ---------------------------------------------------------------- public API


def permute_tokens(
    x: Tensor, expert_ids: Tensor, num_experts: int, align: int = 1, impl: str = "torch", counts: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, H]; expert_ids [T, K] int (top-k choices of each token); counts: `count_tokens(expert_ids,
    num_experts)` where the caller has it already.

    Returns (permuted [N, H], tokens_per_expert [num_experts] int64, row_index [T*K] int64).
    Rows are grouped expert-major; inside one expert, rows are in (token, k) order (stable). With
    align > 1 each expert's group is padded with zero rows to a multiple of `align` (for grouped
    GEMM); tokens_per_expert then holds the padded group sizes and N = their sum. row_index[t*K + k]
    is the row of permuted holding x[t] for choice k. Differentiable w.r.t. x.
    N depends on shapes only (no host sync): T*K, or with align > 1 the bound T*K + E*(align-1)
    rounded up to `align`, the last expert's group taking the spare rows as extra padding.
    """
    row_index, tokens_per_expert, num_rows, order = _route_rows(expert_ids, num_experts, align, counts)
    if impl == "torch":
        permuted = _permute_torch(x, row_index, num_rows, order, expert_ids.shape[-1])
    elif impl == "triton":
        permuted = torch.ops.moonlight.moe_permute(x, row_index, num_rows)
    else:
        raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
    return permuted, tokens_per_expert, row_index


def unpermute_tokens(y: Tensor, row_index: Tensor, weights: Tensor, impl: str = "torch") -> Tensor:
    """y [N, H] expert outputs in permuted order; weights [T, K] routing weights (any float dtype).

    Returns out [T, H] in y.dtype with out[t] = sum_k weights[t, k] * y[row_index[t*K + k]],
    accumulated in fp32. Differentiable w.r.t. y and weights; padded rows get zero gradient.
    """
    if impl == "torch":
        return _unpermute_torch(y, row_index, weights)
    if impl == "triton":
        return torch.ops.moonlight.moe_unpermute(y, row_index, weights)
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
