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


def _route_rows(expert_ids: Tensor, num_experts: int, align: int) -> tuple[Tensor, Tensor, int]:
    """(row_index [T*K], padded group sizes [E], N) for the expert-major layout."""
    flat = expert_ids.reshape(-1).long()
    # scatter_add instead of bincount: a fixed output shape, so no host sync (bincount reads the max)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    group_sizes = (counts + align - 1) // align * align
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_group = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    group_start = group_sizes.cumsum(0) - group_sizes
    row_index = torch.empty_like(flat).scatter_(0, order, group_start[sorted_experts] + rank_in_group)
    if align == 1:
        return row_index, group_sizes, flat.numel()
    # N from the shapes alone (reading the padded sizes back would be a host sync): the upper bound
    # T*K + E*(align-1), rounded to align; the last group takes the rows left over as more padding.
    num_rows = (flat.numel() + num_experts * (align - 1) + align - 1) // align * align
    group_sizes[-1] += num_rows - group_sizes.sum()
    return row_index, group_sizes, num_rows


def _slot_of_row(row_index: Tensor, num_rows: int) -> Tensor:
    """Inverse of row_index: the (token, choice) slot held by each permuted row, -1 for padding."""
    slots = torch.arange(row_index.numel(), device=row_index.device)
    return torch.full((num_rows,), -1, dtype=torch.long, device=row_index.device).scatter_(0, row_index, slots)


# ---------------------------------------------------------------- PyTorch reference


def _permute_torch(x: Tensor, row_index: Tensor, num_rows: int) -> Tensor:
    top_k = row_index.numel() // max(x.shape[0], 1)  # no tokens: no rows either
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
        src_ptr, slot_of_row_ptr, weights_ptr, dst_ptr, y_ptr, grad_weights_ptr,
        H: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_of_row_ptr + row)
        is_real = slot >= 0  # padding rows are written as zeros
        token = tl.maximum(slot, 0) // TOP_K
        scale = 1.0
        if HAS_WEIGHTS:
            scale = tl.load(weights_ptr + slot, mask=is_real, other=0.0).to(tl.float32)
        # as a vector: the interpreter rejects a scalar bool inside a vector mask
        is_real_cols = tl.zeros([BLOCK_H], dtype=tl.int64) + slot >= 0
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            in_row = cols < H
            vals = tl.load(src_ptr + token * H + cols, mask=in_row & is_real_cols, other=0.0).to(tl.float32)
            tl.store(dst_ptr + row * H + cols, (vals * scale).to(dst_ptr.dtype.element_ty), mask=in_row)
            if WEIGHT_GRAD:
                dot += vals * tl.load(y_ptr + row * H + cols, mask=in_row, other=0.0).to(tl.float32)
        if WEIGHT_GRAD:
            tl.store(grad_weights_ptr + slot, tl.sum(dot, axis=0), mask=is_real)

    @triton.jit
    def _combine_rows_kernel(
        src_ptr, row_index_ptr, weights_ptr, dst_ptr,
        H: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        choices = tl.arange(0, BLOCK_K)
        is_choice = choices < TOP_K
        rows = tl.load(row_index_ptr + token * TOP_K + choices, mask=is_choice, other=0)
        if HAS_WEIGHTS:
            scale = tl.load(weights_ptr + token * TOP_K + choices, mask=is_choice, other=0.0).to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            in_row = cols < H
            mask = is_choice[:, None] & in_row[None, :]
            vals = tl.load(src_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                vals = vals * scale[:, None]
            tl.store(dst_ptr + token * H + cols, tl.sum(vals, axis=0).to(dst_ptr.dtype.element_ty), mask=in_row)


def _num_warps(block_elems: int) -> int:
    return 8 if block_elems >= 4096 else 4


def _expand_rows(src: Tensor, row_index: Tensor, num_rows: int, weights: Tensor | None = None,
                 y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """dst [num_rows, H] (and grad_weights [T*K] fp32 when y is given); see the module docstring."""
    src = src.contiguous()
    num_tokens, hidden = src.shape
    dst = src.new_empty(num_rows, hidden)
    grad_weights = torch.empty(row_index.numel(), dtype=torch.float32, device=src.device) if y is not None else None
    if num_rows == 0:  # an expert-parallel rank can receive no rows: nothing to launch
        return dst, grad_weights
    block_h = min(triton.next_power_of_2(hidden), 4096)
    _expand_rows_kernel[(num_rows,)](
        src, _slot_of_row(row_index, num_rows),
        weights.contiguous() if weights is not None else src,  # unused pointers get a placeholder
        dst, y.contiguous() if y is not None else src, grad_weights if y is not None else src,
        H=hidden, TOP_K=row_index.numel() // num_tokens, BLOCK_H=block_h,
        HAS_WEIGHTS=weights is not None, WEIGHT_GRAD=y is not None, num_warps=_num_warps(block_h),
    )
    return dst, grad_weights


def _combine_rows(src: Tensor, row_index: Tensor, num_tokens: int, weights: Tensor | None = None) -> Tensor:
    """dst [num_tokens, H]; see the module docstring."""
    src = src.contiguous()
    hidden = src.shape[1]
    dst = src.new_empty(num_tokens, hidden)
    if num_tokens == 0:
        return dst
    top_k = row_index.numel() // num_tokens
    block_k = triton.next_power_of_2(top_k)
    block_h = min(triton.next_power_of_2(hidden), max(16, 4096 // block_k))
    _combine_rows_kernel[(num_tokens,)](
        src, row_index, weights.contiguous() if weights is not None else src, dst,
        H=hidden, TOP_K=top_k, BLOCK_K=block_k, BLOCK_H=block_h,
        HAS_WEIGHTS=weights is not None, num_warps=_num_warps(block_k * block_h),
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


def permute_tokens(x: Tensor, expert_ids: Tensor, num_experts: int, align: int = 1, impl: str = "torch"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, H]; expert_ids [T, K] int (top-k choices of each token).

    Returns (permuted [N, H], tokens_per_expert [num_experts] int64, row_index [T*K] int64).
    Rows are grouped expert-major; inside one expert, rows are in (token, k) order (stable). With
    align > 1 each expert's group is padded with zero rows to a multiple of `align` (for grouped
    GEMM); tokens_per_expert then holds the padded group sizes and N = their sum. row_index[t*K + k]
    is the row of permuted holding x[t] for choice k. Differentiable w.r.t. x.
    N depends on shapes only (no host sync): T*K, or with align > 1 the bound T*K + E*(align-1)
    rounded up to `align`, the last expert's group taking the spare rows as extra padding.
    """
    row_index, tokens_per_expert, num_rows = _route_rows(expert_ids, num_experts, align)
    if impl == "torch":
        permuted = _permute_torch(x, row_index, num_rows)
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
