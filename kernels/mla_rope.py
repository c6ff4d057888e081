"""Fused RoPE for MLA: rotate q's rope channels in place (`rotate_rope_`) and build the per-head key
k = [k_nope | rope(k_pe)] with the rotated shared rope key written into every head (`mla_rope_key`).

Moonlight rotates interleaved pairs (x[2i], x[2i+1]) as complex numbers (HF's de-interleave +
rotate-half, not a rotate-half on the raw channels). Three Triton kernels, one program per
(batch, position): the in-place rotation, the key build, and the key's backward; the torch
reference (impl="torch") does the same with torch ops. The in-place rotation is one opaque op,
`moonlight::rotate_rope_`, so op-level activation checkpointing never rotates twice.
Details: docs/performance.md.
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # without Triton only impl="torch" is available
    triton = None


def rope_tables(seq_len: int, rope_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin [seq_len, rope_dim // 2] fp32 with angle[s, i] = s * base ** (-2i / rope_dim).

    Computed in fp32 exactly as Hugging Face's rotary embedding does, so logits match it bit for bit.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------- PyTorch reference


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """A new tensor: the interleaved pairs of x's last dim rotated by the angles whose cos/sin broadcast
    to x[..., ::2]; math in fp32 (or x's wider dtype), returned in that compute dtype."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x0, x1 = x.to(compute_dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def _rotate_rope_torch_(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, inverse: bool) -> None:
    """In place, rounding as `rotate_pairs` does (each product, then the sum), with half-size temporaries."""
    tail = x.unflatten(-1, (-1, head_dim))[..., head_dim - 2 * cos.shape[-1] :]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    work = tail if tail.dtype == compute_dtype else tail.to(compute_dtype)  # bf16: rotate an fp32 copy
    cos, sin = cos[..., None, :].to(compute_dtype), sin[..., None, :].to(compute_dtype)
    sin = -sin if inverse else sin
    x0, x1 = work[..., 0::2], work[..., 1::2]
    rotated0 = (x0 * cos).sub_(x1 * sin)
    x1.mul_(cos).add_(x0 * sin)
    x0.copy_(rotated0)
    if work is not tail:
        tail.copy_(work)


def _mla_rope_key_torch(k_nope: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    k_rot = rotate_pairs(k_pe, cos, sin).to(k_pe.dtype)
    return torch.cat([k_nope, k_rot.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)


def _mla_rope_key_backward_torch(grad_k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    tail = grad_k[..., grad_k.shape[-1] - 2 * cos.shape[-1] :]
    summed = tail.sum(2, dtype=torch.promote_types(tail.dtype, torch.float32))  # over heads
    return rotate_pairs(summed, cos, -sin).to(grad_k.dtype)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _rotate_rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        seq_len,
        x_stride_b,
        x_stride_s,
        x_stride_h,
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS: tl.constexpr,
        OFFSET: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        INVERSE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row = b * seq_len + s
        b = row // seq_len
        s = row % seq_len
        pairs = tl.arange(0, BLOCK_HALF)
        is_pair = pairs < HALF
        table = b * cos_stride_b + s * cos_stride_s + pairs
        cos = tl.load(cos_ptr + table, mask=is_pair, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + table, mask=is_pair, other=0.0).to(tl.float32)[None, :]
        if INVERSE:  # the backward rotates by -theta
            sin = -sin

        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        even = x_ptr + b * x_stride_b + s * x_stride_s + heads * x_stride_h + OFFSET + 2 * pairs[None, :]
        mask = (heads < NUM_HEADS) & is_pair[None, :]
        x0 = tl.load(even, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(even + 1, mask=mask, other=0.0).to(tl.float32)
        x_dtype = x_ptr.dtype.element_ty
        tl.store(even, (x0 * cos - x1 * sin).to(x_dtype), mask=mask)
        tl.store(even + 1, (x1 * cos + x0 * sin).to(x_dtype), mask=mask)

    @triton.jit
    def _mla_rope_key_kernel(
        k_nope_ptr,
        k_pe_ptr,
        cos_ptr,
        sin_ptr,
        k_ptr,
        seq_len,
        nope_stride_b,
        nope_stride_s,
        nope_stride_h,
        pe_stride_b,
        pe_stride_s,
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS: tl.constexpr,
        NOPE: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_NOPE: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq_len
        s = row % seq_len
        head_dim: tl.constexpr = NOPE + 2 * HALF
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        k_out = k_ptr + row * NUM_HEADS * head_dim + heads * head_dim
        k_dtype = k_ptr.dtype.element_ty

        nope = tl.arange(0, BLOCK_NOPE)[None, :]
        nope_mask = (heads < NUM_HEADS) & (nope < NOPE)
        k_nope = tl.load(
            k_nope_ptr + b * nope_stride_b + s * nope_stride_s + heads * nope_stride_h + nope, mask=nope_mask
        )
        tl.store(k_out + nope, k_nope.to(k_dtype), mask=nope_mask)

        pairs = tl.arange(0, BLOCK_HALF)
        is_pair = pairs < HALF
        table = b * cos_stride_b + s * cos_stride_s + pairs
        cos = tl.load(cos_ptr + table, mask=is_pair, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=is_pair, other=0.0).to(tl.float32)
        k_in = k_pe_ptr + b * pe_stride_b + s * pe_stride_s + 2 * pairs
        k0 = tl.load(k_in, mask=is_pair, other=0.0).to(tl.float32)
        k1 = tl.load(k_in + 1, mask=is_pair, other=0.0).to(tl.float32)
        # rounded to k_pe's dtype first, as the reference does, then broadcast over the heads
        rot0 = (k0 * cos - k1 * sin).to(k_pe_ptr.dtype.element_ty).to(k_dtype)
        rot1 = (k1 * cos + k0 * sin).to(k_pe_ptr.dtype.element_ty).to(k_dtype)
        rope_mask = (heads < NUM_HEADS) & is_pair[None, :]
        even = k_out + NOPE + 2 * pairs[None, :]
        tl.store(even, tl.broadcast_to(rot0[None, :], (BLOCK_HEADS, BLOCK_HALF)), mask=rope_mask)
        tl.store(even + 1, tl.broadcast_to(rot1[None, :], (BLOCK_HEADS, BLOCK_HALF)), mask=rope_mask)

    @triton.jit
    def _mla_rope_key_backward_kernel(
        grad_k_ptr,
        cos_ptr,
        sin_ptr,
        grad_pe_ptr,
        seq_len,
        grad_stride_b,
        grad_stride_s,
        grad_stride_h,
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS: tl.constexpr,
        NOPE: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq_len
        s = row % seq_len
        pairs = tl.arange(0, BLOCK_HALF)
        is_pair = pairs < HALF
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        mask = (heads < NUM_HEADS) & is_pair[None, :]
        even = grad_k_ptr + b * grad_stride_b + s * grad_stride_s + heads * grad_stride_h + NOPE + 2 * pairs[None, :]
        g0 = tl.sum(tl.load(even, mask=mask, other=0.0).to(tl.float32), axis=0)  # over heads, in fp32
        g1 = tl.sum(tl.load(even + 1, mask=mask, other=0.0).to(tl.float32), axis=0)
        table = b * cos_stride_b + s * cos_stride_s + pairs
        cos = tl.load(cos_ptr + table, mask=is_pair, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=is_pair, other=0.0).to(tl.float32)
        out = grad_pe_ptr + row * 2 * HALF + 2 * pairs
        g_dtype = grad_pe_ptr.dtype.element_ty
        tl.store(out, (g0 * cos + g1 * sin).to(g_dtype), mask=is_pair)  # rotation by -theta
        tl.store(out + 1, (g1 * cos - g0 * sin).to(g_dtype), mask=is_pair)


def _table_strides(cos: Tensor, sin: Tensor, batch: int) -> tuple[Tensor, Tensor, int, int]:
    """cos/sin [S, R/2] (shared by the batch) or [B, S, R/2] (per-token angles) as dense-channel
    [B, S, R/2] views, with their batch and position strides."""
    cos, sin = (t.contiguous().expand(batch, *t.shape[-2:]) for t in (cos, sin))
    return cos, sin, cos.stride(0), cos.stride(1)


def _launch_heads(num_heads: int, width: int) -> dict:
    block_heads = triton.next_power_of_2(num_heads)
    return dict(BLOCK_HEADS=block_heads, num_warps=4 if block_heads * width <= 2048 else 8)


def _rotate_rope_triton_(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, inverse: bool) -> None:
    if x.stride(-1) != 1:  # the kernel wants dense channels; rotate a copy and write it back
        dense = x.contiguous()
        _rotate_rope_triton_(dense, cos, sin, head_dim, inverse)
        x.copy_(dense)
        return
    x = x.unflatten(-1, (-1, head_dim))
    batch, seq_len, num_heads, _ = x.shape
    half = cos.shape[-1]
    cos, sin, cos_stride_b, cos_stride_s = _table_strides(cos, sin, batch)
    _rotate_rope_kernel[(batch * seq_len,)](
        x,
        cos,
        sin,
        seq_len,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS=num_heads,
        OFFSET=head_dim - 2 * half,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        INVERSE=inverse,
        **_launch_heads(num_heads, half),
    )


def _mla_rope_key_triton(k_nope: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    k_nope = k_nope if k_nope.stride(-1) == 1 else k_nope.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    batch, seq_len, num_heads, nope = k_nope.shape
    half = cos.shape[-1]
    k = k_nope.new_empty(
        (batch, seq_len, num_heads, nope + 2 * half), dtype=torch.promote_types(k_nope.dtype, k_pe.dtype)
    )
    cos, sin, cos_stride_b, cos_stride_s = _table_strides(cos, sin, batch)
    block_nope = max(1, triton.next_power_of_2(nope))  # nope may be 0
    _mla_rope_key_kernel[(batch * seq_len,)](
        k_nope,
        k_pe,
        cos,
        sin,
        k,
        seq_len,
        k_nope.stride(0),
        k_nope.stride(1),
        k_nope.stride(2),
        k_pe.stride(0),
        k_pe.stride(1),
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS=num_heads,
        NOPE=nope,
        HALF=half,
        BLOCK_NOPE=block_nope,
        BLOCK_HALF=triton.next_power_of_2(half),
        **_launch_heads(num_heads, block_nope),
    )
    return k


def _mla_rope_key_backward_triton(grad_k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    grad_k = grad_k if grad_k.stride(-1) == 1 else grad_k.contiguous()
    batch, seq_len, num_heads, head_dim = grad_k.shape
    half = cos.shape[-1]
    grad_pe = grad_k.new_empty((batch, seq_len, 2 * half))
    cos, sin, cos_stride_b, cos_stride_s = _table_strides(cos, sin, batch)
    _mla_rope_key_backward_kernel[(batch * seq_len,)](
        grad_k,
        cos,
        sin,
        grad_pe,
        seq_len,
        grad_k.stride(0),
        grad_k.stride(1),
        grad_k.stride(2),
        cos_stride_b,
        cos_stride_s,
        NUM_HEADS=num_heads,
        NOPE=head_dim - 2 * half,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        **_launch_heads(num_heads, half),
    )
    return grad_pe


# ------------------------------------------------------------- custom ops (opaque to torch.compile and checkpointing)


@torch.library.custom_op("moonlight::rotate_rope_", mutates_args=("x",))
def _rotate_rope_op(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, inverse: bool, use_triton: bool) -> None:
    (_rotate_rope_triton_ if use_triton else _rotate_rope_torch_)(x, cos, sin, head_dim, inverse)


@_rotate_rope_op.register_fake
def _(x, cos, sin, head_dim, inverse, use_triton):
    return None


@torch.library.custom_op("moonlight::mla_rope_key", mutates_args=())
def _mla_rope_key_op(k_nope: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _mla_rope_key_triton(k_nope, k_pe, cos, sin)


@_mla_rope_key_op.register_fake
def _(k_nope, k_pe, cos, sin):
    return k_nope.new_empty(
        (*k_nope.shape[:-1], k_nope.shape[-1] + k_pe.shape[-1]), dtype=torch.promote_types(k_nope.dtype, k_pe.dtype)
    )


@torch.library.custom_op("moonlight::mla_rope_key_backward", mutates_args=())
def _mla_rope_key_backward_op(grad_k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return _mla_rope_key_backward_triton(grad_k, cos, sin)


@_mla_rope_key_backward_op.register_fake
def _(grad_k, cos, sin):
    return grad_k.new_empty((*grad_k.shape[:2], 2 * cos.shape[-1]))


def _owned(grad: Tensor) -> bool:
    """Whether a gradient may be overwritten: no broadcast (zero-stride) dims, no graph of its own."""
    return not grad.requires_grad and all(stride != 0 or size == 1 for stride, size in zip(grad.stride(), grad.shape))


class _RotateRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, head_dim, use_triton, grad_in_place, out_of_place):
        if out_of_place:
            x = x.clone()
        torch.ops.moonlight.rotate_rope_(x, cos, sin, head_dim, False, use_triton)
        if not out_of_place:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.head_dim, ctx.use_triton, ctx.grad_in_place = head_dim, use_triton, grad_in_place
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if ctx.grad_in_place and _owned(grad) else grad.clone()
        torch.ops.moonlight.rotate_rope_(grad, cos, sin, ctx.head_dim, True, ctx.use_triton)
        return grad, None, None, None, None, None, None


class _MlaRopeKey(torch.autograd.Function):
    """k = [k_nope | rope(k_pe) in every head]."""

    @staticmethod
    def forward(ctx, k_nope, k_pe, cos, sin, use_triton):
        ctx.save_for_backward(cos, sin)
        ctx.use_triton, ctx.nope = use_triton, k_nope.shape[-1]
        return (torch.ops.moonlight.mla_rope_key if use_triton else _mla_rope_key_torch)(k_nope, k_pe, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_k):
        cos, sin = ctx.saved_tensors
        key_backward = torch.ops.moonlight.mla_rope_key_backward if ctx.use_triton else _mla_rope_key_backward_torch
        return grad_k[..., : ctx.nope], key_backward(grad_k, cos, sin), None, None, None


# ---------------------------------------------------------------- public API


def _use_triton(impl: str) -> bool:
    if impl not in ("torch", "triton"):
        raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
    return impl == "triton"


def rotate_rope_(
    x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, impl: str = "torch", grad_in_place: bool = False
) -> Tensor:
    """Rotate the last R channels of every head of x [B, S, H * head_dim] in place and return x;
    cos, sin [S, R // 2] fp32 tables from rope_tables, or [B, S, R // 2] with each token's own angles
    (packed documents).

    Rotates interleaved pairs (x[2i], x[2i+1]) -> (x0*c - x1*s, x1*c + x0*s), keeping the interleaved
    order; math in fp32, stored in x's dtype. x must not be needed by the backward of whatever
    produced it. A view that requires grad is rotated into a copy instead (autograd would copy the
    gradient twice for an in-place view, and refuses it for views made by custom Functions, as
    tensor parallel's local outputs are). grad_in_place=True lets the backward rotate x's incoming
    gradient in place: only when nothing else holds that gradient (true when x feeds attention only,
    whose backward hands out a fresh one).
    """
    if not torch.is_grad_enabled():  # no graph to record: the op itself (compiles under no_grad)
        torch.ops.moonlight.rotate_rope_(x, cos, sin, head_dim, False, _use_triton(impl))
        return x
    out_of_place = x.requires_grad and x._base is not None
    return _RotateRope.apply(x, cos, sin, head_dim, _use_triton(impl), grad_in_place, out_of_place)


def mla_rope_key(k_nope: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor, impl: str = "torch") -> Tensor:
    """The per-head MLA key [B, S, H, N + R] = [k_nope | rope(k_pe) in every head] from k_nope
    [B, S, H, N] and the shared rope key k_pe [B, S, R], in one pass; tables as for `rotate_rope_`.
    Differentiable w.r.t. k_nope and k_pe."""
    return _MlaRopeKey.apply(k_nope, k_pe, cos, sin, _use_triton(impl))
