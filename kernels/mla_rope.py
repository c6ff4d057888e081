"""Fused RoPE for MLA: rotate the rope channels of q (all heads) and of the shared k_pe in one pass.

Moonlight (DeepSeek-V3) rotates interleaved pairs (x[2i], x[2i+1]) as complex numbers and keeps
the interleaved order; this equals HF's de-interleave + rotate-half, and is NOT a plain
rotate-half on the raw channels. The Triton kernel runs one program per (batch, position): it
copies the nope channels of every head, rotates the rope channels of every head and of the
k_pe row, and writes fresh contiguous outputs, so no split/cat is needed around it. The
backward is the same kernel rotating by -theta.
"""
import torch
from torch import Tensor

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


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last dim of x by the angles whose cos/sin broadcast to x[..., ::2]."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x0, x1 = x.to(compute_dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)


def _mla_rope_torch(q: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    nope = q.shape[-1] - k_pe.shape[-1]
    q_rot = _rotate_pairs(q[..., nope:], cos[:, None, :], sin[:, None, :])  # broadcast over heads
    return torch.cat((q[..., :nope], q_rot), dim=-1), _rotate_pairs(k_pe, cos, sin)


# ---------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _mla_rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        seq_len, q_stride_b, q_stride_s, q_stride_h, k_stride_b, k_stride_s,
        NUM_HEADS: tl.constexpr, NOPE: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr,
        INVERSE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row = b * seq_len + s
        b = row // seq_len
        s = row % seq_len
        head_dim: tl.constexpr = NOPE + 2 * HALF

        pairs = tl.arange(0, BLOCK_HALF)
        is_pair = pairs < HALF
        cos = tl.load(cos_ptr + s * HALF + pairs, mask=is_pair, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + s * HALF + pairs, mask=is_pair, other=0.0).to(tl.float32)
        if INVERSE:  # the backward rotates by -theta
            sin = -sin

        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        q_in = q_ptr + b * q_stride_b + s * q_stride_s + heads * q_stride_h
        q_out = q_out_ptr + row * NUM_HEADS * head_dim + heads * head_dim

        nope = tl.arange(0, BLOCK_NOPE)[None, :]
        nope_mask = (heads < NUM_HEADS) & (nope < NOPE)
        tl.store(q_out + nope, tl.load(q_in + nope, mask=nope_mask), mask=nope_mask)

        even = NOPE + 2 * pairs[None, :]
        rope_mask = (heads < NUM_HEADS) & is_pair[None, :]
        q0 = tl.load(q_in + even, mask=rope_mask, other=0.0).to(tl.float32)
        q1 = tl.load(q_in + even + 1, mask=rope_mask, other=0.0).to(tl.float32)
        q_dtype = q_out_ptr.dtype.element_ty
        tl.store(q_out + even, (q0 * cos[None, :] - q1 * sin[None, :]).to(q_dtype), mask=rope_mask)
        tl.store(q_out + even + 1, (q1 * cos[None, :] + q0 * sin[None, :]).to(q_dtype), mask=rope_mask)

        k_in = k_ptr + b * k_stride_b + s * k_stride_s
        k_out = k_out_ptr + row * 2 * HALF
        k0 = tl.load(k_in + 2 * pairs, mask=is_pair, other=0.0).to(tl.float32)
        k1 = tl.load(k_in + 2 * pairs + 1, mask=is_pair, other=0.0).to(tl.float32)
        k_dtype = k_out_ptr.dtype.element_ty
        tl.store(k_out + 2 * pairs, (k0 * cos - k1 * sin).to(k_dtype), mask=is_pair)
        tl.store(k_out + 2 * pairs + 1, (k1 * cos + k0 * sin).to(k_dtype), mask=is_pair)


def _mla_rope_triton(q: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    # any batch/seq/head strides are fine; the channel dim must be dense
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    batch, seq_len, num_heads, head_dim = q.shape
    half = k_pe.shape[-1] // 2
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k_pe.shape, dtype=k_pe.dtype, device=k_pe.device)
    block_nope = max(1, triton.next_power_of_2(head_dim - 2 * half))  # nope may be 0
    block_heads = triton.next_power_of_2(num_heads)
    _mla_rope_kernel[(batch * seq_len,)](
        q, k_pe, cos.contiguous(), sin.contiguous(), q_out, k_out,
        seq_len, q.stride(0), q.stride(1), q.stride(2), k_pe.stride(0), k_pe.stride(1),
        NUM_HEADS=num_heads, NOPE=head_dim - 2 * half, HALF=half,
        BLOCK_HEADS=block_heads, BLOCK_NOPE=block_nope, BLOCK_HALF=triton.next_power_of_2(half),
        INVERSE=inverse, num_warps=4 if block_heads * block_nope <= 2048 else 8,
    )
    return q_out, k_out


# ---------------------------------------------------------------- custom op (autograd + torch.compile)


@torch.library.custom_op("moonlight::mla_rope", mutates_args=())
def _mla_rope_op(q: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    return _mla_rope_triton(q, k_pe, cos, sin, inverse)


@_mla_rope_op.register_fake
def _(q, k_pe, cos, sin, inverse):
    return q.new_empty(q.shape), k_pe.new_empty(k_pe.shape)


def _mla_rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _mla_rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = torch.ops.moonlight.mla_rope(grad_q, grad_k, cos, sin, not ctx.inverse)
    return grad_q, grad_k, None, None, None


_mla_rope_op.register_autograd(_mla_rope_backward, setup_context=_mla_rope_setup_context)


# ---------------------------------------------------------------- public API


def apply_mla_rope(q: Tensor, k_pe: Tensor, cos: Tensor, sin: Tensor, impl: str = "torch") -> tuple[Tensor, Tensor]:
    """q [B, S, NH, D] whose last R channels per head are rope channels; k_pe [B, S, R] (shared by all heads);
    cos, sin [S, R // 2] fp32 tables from rope_tables.

    Rotates interleaved pairs (x[2i], x[2i+1]) -> (x0*c - x1*s, x1*c + x0*s), keeping the interleaved
    order. Returns new tensors (q_out like q with the nope channels unchanged, k_out like k_pe); math
    in fp32, stored in the input dtype. Differentiable w.r.t. q and k_pe.
    """
    if impl == "torch":
        return _mla_rope_torch(q, k_pe, cos, sin)
    if impl == "triton":
        return torch.ops.moonlight.mla_rope(q, k_pe, cos, sin, False)
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")
