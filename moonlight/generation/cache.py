"""The static MLA latent cache, the prompt's forward (prefill) that fills it, and the cached decode forward.

The cache (DeepSeek-V3's "absorb" inference) keeps, per token and layer, only what MLA computes
before expanding to heads: the normalized latent (kv_lora_rank) and the rotated rope key. Its
buffers are allocated once, at their full length, and written in place at slots the device holds,
so a decode step has static shapes and reads nothing back to the host.
Prefill is the model's own blocks (the training attention kernels: SDPA, or varlen flash for a
left-padded bf16 batch on CUDA), with each MLA's `key_exchange` wrapped to copy its keys into the cache.
Decode absorbs kv_b_proj's two halves into the query and the output: q_nope @ W_UK scores against
the latents directly and the weighted latents go through W_UV before o_proj.
"""

from __future__ import annotations

import contextlib

import torch

from moonlight.config import ModelArgs
from moonlight.generation.moe import moe_decode
from moonlight.kernels.backend import resolve_impl
from moonlight.kernels.mla_rope import rotate_pairs, rotate_rope_
from moonlight.model import MLA, DocumentMask, MoE, Moonlight
from moonlight.model.model import rope_angles


def cache_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Latent-cache bytes per token over all layers: (kv_lora_rank + qk_rope_head_dim) values a layer."""
    return args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.itemsize


def per_head_kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """What a standard per-head K/V cache (as transformers keeps for MLA) stores per token."""
    return args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * dtype.itemsize


class LatentCache:
    """One [layers, B, max_len, kv_lora_rank + qk_rope_head_dim] buffer (the latent after kv_norm, then
    the rope key after RoPE; `layers` are its per-layer views), `is_token` [B, max_len] (the slots that
    hold real tokens: left padding and unwritten slots do not), and on the device `slot` [1], where
    the next token goes, and `positions` [B], its RoPE position in each row (real tokens before it).
    Every tensor keeps its address for the cache's life (CUDA graphs replay on them)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device):
        self.args, self.max_len = args, max_len
        # zeros, not empty: masked slots still meet the attention weights (0 * NaN would be NaN)
        self.kv = torch.zeros(
            args.num_hidden_layers,
            batch_size,
            max_len,
            args.kv_lora_rank + args.qk_rope_head_dim,
            dtype=dtype,
            device=device,
        )
        self.layers = [self.kv[i] for i in range(args.num_hidden_layers)]
        self.is_token = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        cos, sin = rope_angles(args, max_len, None, torch.device(device))
        self.cos, self.sin = cos[:max_len].clone(), sin[:max_len].clone()  # own copies: static addresses
        self.filled = False  # host-side: whether a prompt was prefilled
        for t in (self.kv, self.is_token, self.slot, self.positions, self.cos, self.sin):
            torch._dynamo.mark_static_address(t)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def reset(self):
        self.is_token.zero_()
        self.filled = False


class _WritesKeys:
    """An MLA `key_exchange` that also writes the layer's keys (latent, rotated k_pe) into its cache slots
    0..S-1, then does what the wrapped one does."""

    def __init__(self, inner, cache_layer: torch.Tensor):
        self.inner, self.cache_layer = inner, cache_layer

    def gather_keys(self, latent, k_pe, cos, sin, impl):
        rotated = rotate_pairs(k_pe, cos, sin).to(k_pe.dtype)  # as rotate_rope_ rounds it in decode
        self.cache_layer[:, : latent.shape[1]] = torch.cat([latent, rotated], dim=-1)
        return self.inner.gather_keys(latent, k_pe, cos, sin, impl)

    def attention(self, q, k, v, scale, mask):
        return self.inner.attention(q, k, v, scale, mask)


@contextlib.contextmanager
def _writing_keys(model: Moonlight, cache: LatentCache):
    attns = [layer.attn for layer in model.layers.values()]
    saved = [attn.key_exchange for attn in attns]
    for attn, inner, cache_layer in zip(attns, saved, cache.layers):
        attn.key_exchange = _WritesKeys(inner, cache_layer)
    try:
        yield
    finally:
        for attn, inner in zip(attns, saved):
            attn.key_exchange = inner


@torch.no_grad()
def prefill(
    model: Moonlight, tokens: torch.Tensor, cache: LatentCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the prompt tokens [B, S] (attention_mask [B, S]: 0 marks left padding) through the model's
    blocks into an empty cache; return the logits [B, V] of the last token. A token's position counts
    the real tokens before it; padding forms a document of its own that no real token sees."""
    if cache.filled:
        raise ValueError("prefill needs an empty cache (cache.reset())")
    bsz, seqlen = tokens.shape
    is_token = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    padded = not bool(is_token.all())  # one host read per prompt, none per token
    positions = (is_token.cumsum(-1) - 1).clamp(min=0)
    h = model.embed(tokens)
    # the ids on the host: the varlen kernel's bounds are found there (see DocumentMask)
    mask = DocumentMask(is_token.long().cpu(), h.dtype, h.device) if padded else None
    rope = rope_angles(model.args, seqlen, positions, h.device)
    with _writing_keys(model, cache):
        for layer in model.layers.values():
            h = layer(h, rope=rope, mask=mask)
    cache.is_token[:, :seqlen] = is_token
    cache.slot.fill_(seqlen)
    cache.positions.copy_(is_token.sum(-1))
    cache.filled = True
    return model.lm_head(model.norm(h[:, -1]))


def absorbed_attention(
    attn: MLA,
    x: torch.Tensor,
    cache_layer: torch.Tensor,
    slot: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """MLA for one token a row, x [B, 1, H], over every slot of the layer's cache [B, max_len, C + R]
    (its own keys written at `slot` [1] first). cos/sin [B, 1, R/2]: its angles; allowed [B, 1, max_len]:
    the slots it sees."""
    a = attn.args
    bsz, seqlen, _ = x.shape
    nope, rope = a.qk_nope_head_dim, a.qk_rope_head_dim
    q = attn.q_proj(x) if a.q_lora_rank is None else attn.q_b_proj(attn.q_norm(attn.q_a_proj(x)))
    kv = attn.kv_a_proj(x)
    # k_pe is the rope tail of kv_a_proj's output: rotate it there, as one head as wide as that output
    impl = resolve_impl(a.kernels, x.device)
    q = rotate_rope_(q, cos, sin, a.qk_head_dim, impl=impl).view(bsz, seqlen, -1, a.qk_head_dim)
    latent, k_pe = rotate_rope_(kv, cos, sin, kv.shape[-1], impl=impl).split([a.kv_lora_rank, rope], dim=-1)
    cache_layer.index_copy_(1, slot, torch.cat([attn.kv_norm(latent), k_pe], dim=-1))
    latents, keys_pe = cache_layer.split([a.kv_lora_rank, rope], dim=-1)

    kv_b = attn.kv_b_proj.weight.view(-1, nope + a.v_head_dim, a.kv_lora_rank)  # [heads, nope + v, latent]
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, kv_b[:, :nope])  # W_UK absorbed into the query
    scores = (
        torch.einsum("bthc,bsc->bhts", q_latent, latents) + torch.einsum("bthr,bsr->bhts", q_pe, keys_pe)
    ) * attn.softmax_scale
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
    out_latent = torch.einsum("bhts,bsc->bthc", probs, latents)
    out = torch.einsum("bthc,hdc->bthd", out_latent, kv_b[:, nope:])  # W_UV absorbed into the output
    return attn.o_proj(out.flatten(2))


def decode(model: Moonlight, tokens: torch.Tensor, cache: LatentCache) -> torch.Tensor:
    """Append one token a row, tokens [B], at the cache's slot; return the logits [B, V] of the next.
    Static shapes, no host reads: compiles with fullgraph=True and replays as a CUDA graph."""
    slot, positions = cache.slot, cache.positions
    cache.is_token.index_fill_(1, slot, True)
    cos, sin = cache.cos.index_select(0, positions)[:, None], cache.sin.index_select(0, positions)[:, None]
    allowed = cache.is_token[:, None, :]  # every written real slot: later slots are not written yet
    h = model.embed(tokens[:, None])
    for i, layer in enumerate(model.layers.values()):  # Block.forward with the cached attention
        # cache.kv[i], not the `layers` views: under CUDA graphs only tensors marked static may be written
        h = h + absorbed_attention(layer.attn, layer.attn_norm(h), cache.kv[i], slot, cos, sin, allowed)
        x = layer.ffn_norm(h)
        h = h + (moe_decode(layer.ffn, x) if isinstance(layer.ffn, MoE) else layer.ffn(x))
    slot.add_(1)
    positions.add_(1)
    return model.lm_head(model.norm(h[:, -1]))
