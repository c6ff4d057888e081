"""Moonlight-16B-A3B: DeepSeek-V3 architecture (MLA attention + sigmoid-routed MoE), in one file.

The model is pure compute: no torch.distributed imports. Parallel plans in `moonlight.parallel`
are applied to a built model by module name, and swap objects the layers call: the experts'
`dispatcher` (see `LocalDispatcher`), the MoE layer's `sequences` (see `WholeSequences`) and the
attention's `key_exchange` (see `LocalKeyExchange`). Build on the meta device and call `init_weights()` to
plan a 16B model without allocating it.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.sym_node import DynamicInt
from torch.nn.attention.varlen import varlen_attn

from moonlight.kernels.backend import resolve_impl
from moonlight.kernels.grouped_mm import grouped_mm
from moonlight.kernels.mla_rope import mla_rope_key, rope_tables, rotate_rope_
from moonlight.kernels.moe_permute import count_tokens, permute_tokens, unpermute_tokens
from moonlight.kernels.moe_router import route_topk
from moonlight.kernels.rms_norm import rms_norm
from moonlight.config import ModelArgs
from moonlight.distributed import local_tensor, to_device
from moonlight.dtypes import at_least_fp32


class RMSNorm(nn.Module):
    """Normalize in fp32 (or fp64), scale in the input dtype (as the HF reference does). ``kernels``: the
    config's setting (`resolve_impl`); tensor-parallel norms (DTensor weights) take the reference."""

    def __init__(self, dim: int, eps: float, kernels: str = "auto"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = hasattr(x, "placements") or hasattr(self.weight, "placements")
        impl = "torch" if distributed else resolve_impl(self.kernels, x.device)
        return rms_norm(x, self.weight, self.eps, impl=impl)

    def init_weights(self):
        nn.init.ones_(self.weight)


@functools.lru_cache(maxsize=8)
def _rope_tables(seqlen: int, rope_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE cos/sin tables, built once per length and device (as ordinary tensors even when first
    asked for under inference mode)."""
    with torch.inference_mode(False), torch.no_grad():
        return rope_tables(seqlen, rope_dim, theta, device)


def rope_angles(
    args: ModelArgs, seqlen: int, positions: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE cos/sin of one forward, shared by every layer: the tables [L, R/2] (a layer takes
    rows 0..S-1), or with positions [B, S] (packed documents, context-parallel slices) each token's
    own [B, S, R/2]. Made outside the layers, so a compiled layer takes them as inputs instead of
    rebuilding them. The tables cover max_position_embeddings (the trainer's limit on seq_len): the
    layers may see more tokens than `seqlen`, the local part of a sequence-parallel shard."""
    cos, sin = _rope_tables(max(seqlen, args.max_position_embeddings), args.qk_rope_head_dim, args.rope_theta, device)
    return (cos, sin) if positions is None else (cos[positions], sin[positions])


# The seams parallel plans swap (each a typing.Protocol; the plain-model default follows each one).
class KeyExchange(Protocol):
    """MLA's access to the keys of the rest of each sequence (`MLA.key_exchange`)."""

    def gather_keys(
        self, latent: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: DocumentMask | None
    ) -> torch.Tensor: ...


class SequenceSplit(Protocol):
    """How a MoE layer's input splits sequences over processes (`MoE.sequence_split`)."""

    shards: int
    loss_scale: int

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def shared_weight(self, w: torch.Tensor) -> torch.Tensor: ...


class Dispatcher(Protocol):
    """Moves token copies to their experts and back (`GroupedExperts.dispatcher`)."""

    communicates: bool

    def dispatch(
        self, x: torch.Tensor, expert_ids: torch.Tensor, counts: torch.Tensor, impl: str
    ) -> tuple[torch.Tensor, torch.Tensor, object]: ...

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: object, impl: str) -> torch.Tensor: ...


class LocalKeyExchange:
    """Where the rest of each sequence is, for attention: here. This process holds whole sequences,
    so attention is plain causal attention. Context parallel (`moonlight.parallel.context`) swaps
    `MLA.key_exchange` for an object with the same two methods that holds a slice of every sequence
    and reaches the others over its group."""

    def gather_keys(
        self, latent: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLA's keys [B, S_local, C] (the normalized latent, the rope key k_pe) and their RoPE tables ->
        those of the keys the local queries may see, in sequence order, with the tables that rotate
        the returned k_pe (`mla_rope_key` applies them)."""
        return latent, k_pe, cos, sin

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: DocumentMask | None
    ) -> torch.Tensor:
        """q [B, S, heads, D], k/v [B, S_keys, heads, D] (from `gather_keys`) -> [B, S, heads, D]."""
        if mask is not None:
            return mask.attention(q, k, v, scale)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
        ).transpose(1, 2)


class MLA(nn.Module):
    """Multi-head Latent Attention: keys and values come from one low-rank latent per token, plus a
    single rope key (k_pe) shared by all heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, heads = args.hidden_size, args.num_attention_heads
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(h, heads * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, args.latent_norm_eps, args.kernels)
            self.q_b_proj = nn.Linear(args.q_lora_rank, heads * args.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(h, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.latent_norm_eps, args.kernels)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * args.v_head_dim, h, bias=False)
        self.softmax_scale = args.qk_head_dim**-0.5
        self.pad_v: bool | None = None  # None: decided per call by `pads_v`
        self.key_exchange: KeyExchange = LocalKeyExchange()

    def pads_v(self, x: torch.Tensor, mask: DocumentMask | None) -> bool:
        """Whether v is padded with zeros to the qk head size for attention: on CPU and for the varlen
        kernel, which want one head size; CUDA's SDPA takes the true v width. `pad_v` overrides it."""
        if self.pad_v is not None:
            return self.pad_v
        return not x.is_cuda or (mask is not None and mask.varlen)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: DocumentMask | None = None
    ) -> torch.Tensor:
        """x [B, S, hidden]; rope: the cos/sin of `rope_angles`."""
        a = self.args
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_norm(self.q_a_proj(x)))
        latent, k_pe = self.kv_a_proj(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        cos, sin = rope
        if cos.dim() == 2:  # positions 0..S-1 of every row
            cos, sin = cos[:seqlen], sin[:seqlen]
        impl = resolve_impl(a.kernels, x.device)
        # q's rope channels rotated in place, before the per-head view (autograd copies the gradient of
        # an in-place view). q feeds attention only, whose backward hands out a fresh gradient: that is
        # rotated in place too.
        q = rotate_rope_(q, cos, sin, a.qk_head_dim, impl=impl, grad_in_place=True)
        q = q.view(bsz, seqlen, -1, a.qk_head_dim)  # -1: heads held by this rank under tensor parallel
        # The keys travel (under context parallel) as the normalized latent plus the k_pe, the smallest
        # per-token form; the per-head up-projection runs after, on the receiving side.
        latent, k_pe, key_cos, key_sin = self.key_exchange.gather_keys(self.kv_norm(latent), k_pe, cos, sin, impl)
        kv = self.kv_b_proj(latent).view(bsz, latent.shape[1], -1, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = mla_rope_key(k_nope, k_pe, key_cos, key_sin, impl=impl)  # [k_nope | rope(k_pe) in every head], one pass
        v_pad = a.qk_head_dim - a.v_head_dim if self.pads_v(x, mask) else 0
        if v_pad > 0:
            v = F.pad(v, (0, v_pad))
        out = self.key_exchange.attention(q, k, v, self.softmax_scale, mask)
        out = out[..., : a.v_head_dim] if v_pad > 0 else out
        return self.o_proj(out.reshape(bsz, seqlen, -1))


class DocumentMask:
    """Causal attention within each packed document: a token sees the earlier tokens of its own
    document only. Built once per forward from ``document_ids [B, S]`` (equal ids = one document,
    documents contiguous within a row) and shared by every layer.

    Half-precision tensors on a device of `varlen_devices` take flash attention's varlen kernel (the
    documents of all rows as one ragged batch, no mask is materialized); everything else (CPU,
    fp32/fp64) takes SDPA with a boolean [B, 1, S, S] block-diagonal causal mask.

    ``device`` is where the activations are (default: the ids'). Pass the ids on the host: the
    varlen kernel's document bounds and longest document are then found there and only copied to
    the device, without a host sync (ids on the device cost two: the bounds' count and the longest
    document). `document_ids` is the ids on ``device`` (context parallel gathers them)."""

    varlen_devices = ("cuda",)

    def __init__(
        self,
        document_ids: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device | None = None,
        varlen: bool | None = None,
    ):
        bsz, seqlen = document_ids.shape
        device = document_ids.device if device is None else torch.device(device)
        if varlen is None:
            varlen = device.type in self.varlen_devices and dtype in (torch.bfloat16, torch.float16)
        self.varlen = varlen
        self.document_ids = to_device(document_ids, device)
        # What a layer's `sequence` derives from the ids, built by the first layer and reused by the
        # others (context parallel's masks against the gathered keys).
        self.derived: dict = {}
        if self.varlen:
            flat = document_ids.flatten()  # where the caller keeps them: the host, ideally
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            starts[::seqlen] = True  # every row starts a document
            bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])
            self.cu_seqlens = to_device(bounds.to(torch.int32), device)
            self.max_len = DynamicInt(int((bounds[1:] - bounds[:-1]).max()))
            # Both change from batch to batch: compiled blocks take them as dynamic from the first
            # batch (else one compile with each static, and again once each has changed: with
            # no_grad's compiles, past torch's 8 per function).
            torch._dynamo.maybe_mark_dynamic(self.cu_seqlens, 0)
        else:
            ids = self.document_ids
            same = ids[:, :, None] == ids[:, None, :]
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
            self.dense = (same & causal).unsqueeze(1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v [B, S, heads, D] -> [B, S, heads, D]."""
        if self.varlen:
            bsz, seqlen = q.shape[:2]
            out = varlen_attn(
                q.flatten(0, 1),
                k.flatten(0, 1),
                v.flatten(0, 1),
                self.cu_seqlens,
                self.cu_seqlens,
                self.max_len,
                self.max_len,
                scale=scale,
                window_size=(-1, 0),
            )
            return out.view(bsz, seqlen, *out.shape[1:])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.dense, scale=scale
        )
        return out.transpose(1, 2)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, bit for bit, keeping only gate and up for the backward: silu(gate) is made again
    there instead of being stored, and every product is written into a buffer this op owns. Two fewer
    [N, I] activations per call than autograd's silu and mul; on CPU a fresh activation costs more
    (its pages are faulted in) than the silu it saves."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        # in place in eager only: compiled graphs functionalize it anyway, and torch 2.11's dynamo gives an
        # output its forward changed in place a zero gradient (pytorch/pytorch#180642)
        return F.silu(gate) * up if torch.compiler.is_compiling() else F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layer(s) and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class WholeSequences:
    """What a MoE layer's input holds, for what needs whole sequences (the sequence aux loss) or every
    token (the router weight's gradient): the default, whole sequences on this process. When each
    process routes only one part of every sequence (context parallel, or expert parallel spanning
    tensor parallel), the parallel plan swaps in an object with the same members
    (`moonlight.parallel.tensor.SequenceShards`)."""

    shards = 1  # the parts each sequence is split into, one per process
    # the factor on each part's aux-loss share: the number of parts whose gradients data parallel
    # averages rather than sums (context parallel's)
    loss_scale = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes holding the other parts of the same sequences (not differentiated)."""
        return t

    def shared_weight(self, w: torch.Tensor) -> torch.Tensor:
        """w as this part's tokens use it: the same values, and its gradient summed over all parts."""
        return w


WHOLE_SEQUENCES = WholeSequences()


class Router(nn.Module):
    """Sigmoid top-k router with aux-loss-free balancing: `expert_bias` steers which experts are
    chosen but never the weights they are combined with. The bias is a buffer (not learned by
    gradient); the trainer nudges it after each step from the expert loads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        self.init_weights(args.initializer_range)  # usable as built, as nn.Linear is

    @torch.no_grad()
    def init_weights(self, std: float):
        nn.init.normal_(self.weight, std=std)
        self.expert_bias.zero_()

    def forward(
        self, x: torch.Tensor, sequences: SequenceSplit = WHOLE_SEQUENCES
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K], expert ids [T, K], scores [T, E]; fp32, or fp64 for fp64 x).
        ``sequences``: the MoE layer's (its weight's gradient must sum the tokens of every part)."""
        a = self.args
        # at least fp32 before the weight is shared: its gradient is summed over the parts in fp32
        logits = F.linear(at_least_fp32(x), sequences.shared_weight(at_least_fp32(self.weight)))
        # group-limited routing (n_group > 1) has the reference only
        impl = resolve_impl(a.kernels, x.device) if a.n_group == 1 else "torch"
        return route_topk(
            logits,
            self.expert_bias,
            a.num_experts_per_tok,
            a.routed_scaling_factor,
            a.norm_topk_prob,
            a.n_group,
            a.topk_group,
            impl=impl,
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # The bias moves in 1e-3 steps: keep it fp32 whatever dtype the model is cast to.
        self.expert_bias = self.expert_bias.float()
        return self


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on GPUs and fp32/bf16 on CPUs; anything else (float64 parity tests,
    fp32 on GPUs) takes the per-expert loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    return x.dtype == torch.bfloat16 or (x.device.type == "cpu" and x.dtype == torch.float32)


class LocalDispatcher:
    """Moves token copies to the experts of this process and back. Expert parallel replaces it with
    an all-to-all dispatcher of the same two methods."""

    communicates = False  # True: dispatch and combine wait on other processes (worth overlapping)

    def __init__(self, align: int = 1):
        # Rows per expert padded to a multiple of this. The grouped GEMM needs none (torchtitan
        # dropped the 8-row padding for bf16 torch._grouped_mm too); padding never syncs either way.
        self.align = align

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, counts: torch.Tensor, impl: str):
        """counts: the choices of each expert (`count_tokens`) -> (rows [N, H] grouped by local expert,
        rows per local expert [E_local], state for combine)."""
        rows, counts, row_index = permute_tokens(
            x, expert_ids, counts.numel(), align=self.align, impl=impl, counts=counts
        )
        return rows, counts, row_index

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state, impl: str) -> torch.Tensor:
        return unpermute_tokens(y, state, weights, impl=impl)


def grouped_swiglu(
    x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous group of rows. x [N, H]; counts [E]; gate/up [E, I, H];
    down [E, H, I]."""
    if uses_grouped_mm(x):
        offs = counts.cumsum(0, dtype=torch.int32)
        g = grouped_mm(x, gate.transpose(-2, -1), offs)
        u = grouped_mm(x, up.transpose(-2, -1), offs)
        return grouped_mm(swiglu(g, u), down.transpose(-2, -1), offs)
    outs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        outs.append(F.linear(swiglu(F.linear(rows, gate[e]), F.linear(rows, up[e])), down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


class GroupedExperts(nn.Module):
    """The routed experts, stored stacked ([E, ...]) as in the HF layout of one expert per slice."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        e, i, h = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.init_weights(args.initializer_range)  # usable as built, as nn.Linear is

    @torch.no_grad()
    def init_weights(self, std: float):
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=std)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """counts: `count_tokens(expert_ids, n_routed_experts)` where the caller has it already."""
        impl = resolve_impl(self.args.kernels, x.device)
        gate, up, down = local_tensor(self.gate_proj), local_tensor(self.up_proj), local_tensor(self.down_proj)
        if counts is None:
            counts = count_tokens(expert_ids, self.args.n_routed_experts)
        rows, counts, state = self.dispatcher.dispatch(x, expert_ids, counts, impl)
        y = grouped_swiglu(rows, counts, gate, up, down)
        return self.dispatcher.combine(y, weights, state, impl)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the MoE output whose backward also sends the aux loss's gradient into `prob_sums`,
    so the balance loss trains the router without threading it through the model's outputs (which
    pipeline stages could not do). The loss is linear in `prob_sums`: that gradient is the constant
    `grad_prob_sums`, made in the forward (autograd's chain from a ones_like takes three ops)."""

    @staticmethod
    def forward(ctx, out, prob_sums, grad_prob_sums):
        ctx.save_for_backward(grad_prob_sums)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_prob_sums,) = ctx.saved_tensors
        return grad_out, grad_prob_sums, None


class _ProbSums(torch.autograd.Function):
    """scores [bsz * S, E] -> the sums over each sequence's tokens of the scores normalized over the
    experts, [bsz, E]. The backward is the closed form grad_scores[t] = (g[b] - <probs[t], g[b]>) / S_t
    (S_t the sum of token t's scores): four ops where autograd's chain through the division takes
    about ten."""

    @staticmethod
    def forward(ctx, scores, bsz):
        total = scores.sum(-1, keepdim=True)
        probs = (scores / total).view(bsz, -1, scores.shape[-1])
        ctx.save_for_backward(probs, total)
        return probs.sum(1)

    @staticmethod
    def backward(ctx, grad):
        probs, total = ctx.saved_tensors
        grad = grad.unsqueeze(1)
        return (grad - (probs * grad).sum(-1, keepdim=True)).view(total.shape[0], -1).div_(total), None


def sequence_aux_loss(
    scores: torch.Tensor,
    expert_ids: torch.Tensor,
    bsz: int,
    top_k: int,
    sequences: SequenceSplit = WHOLE_SEQUENCES,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.
    P_i: mean over the sequence of the sigmoid scores normalized over all experts; f_i: the fraction
    of the sequence's routing choices that picked expert i, times E / K.

    Returns (prob_sums, weight, all_prob_sums): this part's share of the loss is
    (weight * prob_sums).sum(), linear in prob_sums [bsz, E] (differentiable), so `weight` (constant) is
    its gradient; the loss's value is `aux_loss_value(weight, all_prob_sums, sequences.loss_scale)`.
    ``scores``/``expert_ids`` hold ``bsz`` sequences, or one part of each when ``sequences`` splits them
    over processes: f_i and the value then need sums over all parts (one ``sequences.sum``), and the
    share sum_i f_i * (this part's sum of P_i's terms) differentiates through this part's scores only.
    The shares of all parts add up to the loss, so backpropagating each part's share (times
    ``sequences.loss_scale`` where the parts' gradients are averaged, not summed) gives the loss's
    gradient. ``counts``: `count_tokens(expert_ids, E)` where the caller has it."""
    num_experts = scores.shape[-1]
    seqlen = scores.shape[0] // bsz * sequences.shards
    if bsz == 1 and counts is not None:  # one sequence: its picks are the counts (integers, exact in floats)
        picks = counts.to(scores.dtype).view(1, num_experts)
    else:
        picks = torch.zeros(bsz, num_experts, device=scores.device, dtype=scores.dtype)
        ids = expert_ids.view(bsz, -1)
        picks.scatter_add_(1, ids, scores.new_ones(()).expand(ids.shape))  # broadcast ones: nothing written
    prob_sums = _ProbSums.apply(scores, bsz)
    all_prob_sums = prob_sums.detach()
    if sequences.shards > 1:
        picks, all_prob_sums = sequences.sum(torch.stack([picks, all_prob_sums])).unbind(0)
    # f_i / (seqlen * bsz), every constant in one factor: the loss is then one product and one sum
    weight = picks * (num_experts / (top_k * seqlen * seqlen * bsz) * sequences.loss_scale)
    return prob_sums, weight, all_prob_sums


def aux_loss_value(weight: torch.Tensor, all_prob_sums: torch.Tensor, loss_scale: int = 1) -> torch.Tensor:
    """The sequence aux loss's value from the terms `sequence_aux_loss` returns."""
    value = (weight * all_prob_sums).sum()
    return value if loss_scale == 1 else value / loss_scale


class _Fork(torch.autograd.Function):
    """x -> (x, x) for the routed and the shared experts. The backward adds their gradients in one
    fixed order, so the order the two branches are issued in changes no bit of x's gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, grad_routed, grad_shared):
        if grad_routed is None or grad_shared is None:
            return grad_shared if grad_routed is None else grad_routed
        return grad_routed + grad_shared


class SideStream:
    """`with side:` issues work on a second CUDA stream (after what the current stream has queued);
    `side.join(t)` makes the current stream wait for it before t is used. Inline (a no-op) on other
    devices or when not enabled. Autograd runs each backward op on its forward op's stream."""

    _streams: dict = {}  # one side stream per device, made on first use

    def __init__(self, x: torch.Tensor, enabled: bool = True):
        self.x = x
        self.stream = None
        if enabled and x.is_cuda:
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(x.device)
            self.stream = self._streams[x.device]
        self.context = None

    def __enter__(self):
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.x.device))
            self.x.record_stream(self.stream)  # x is read there: keep its memory until that is done
            self.context = torch.cuda.stream(self.stream)
            self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        if self.stream is not None:
            main = torch.cuda.current_stream(t.device)
            main.wait_stream(self.stream)
            t.record_stream(main)
        return t


class MoE(nn.Module):
    """Routed experts (weighted by the router) plus one shared SwiGLU MLP applied to every token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.router = Router(args)
        self.experts = GroupedExperts(args)
        self.shared_experts = (
            MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size) if args.n_shared_experts else None
        )
        # Token choices per expert in training mode since the trainer last read them (bias update, metrics).
        # Counted on the device (the trainer reduces them once per step); int64 stays exact whatever
        # dtype the model is cast to.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(args.n_routed_experts, dtype=torch.long), persistent=False
        )
        self.aux_loss_coeff = args.aux_loss_alpha if args.seq_aux else 0.0
        self.aux_terms: tuple[torch.Tensor, torch.Tensor] | None = None  # the last aux loss's (weight, all_prob_sums)
        self.sequence_split: SequenceSplit = WHOLE_SEQUENCES  # swapped when each process routes a sequence part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, expert_ids, scores = self.router(x, self.sequence_split)
        counts = count_tokens(expert_ids, self.args.n_routed_experts)  # one histogram: the load and the permute's
        if self.training:  # only training tokens steer the router bias (not validation, not generation)
            self.tokens_per_expert.add_(counts)
        if self.shared_experts is None:
            out = self.experts(x, expert_ids, weights, counts)
        else:
            # The shared experts need no routing: while the dispatcher communicates they run on a side
            # stream (CUDA), issued first so they overlap the all-to-alls. Same ops, same sum: bit-exact.
            x_routed, x_shared = _Fork.apply(x)
            side = SideStream(x_shared, enabled=self.experts.dispatcher.communicates)
            with side:
                shared = self.shared_experts(x_shared)
            out = self.experts(x_routed, expert_ids, weights, counts) + side.join(shared)
        out = out.view(shape)
        if self.training and self.aux_loss_coeff > 0 and torch.is_grad_enabled():
            prob_sums, weight, all_prob_sums = sequence_aux_loss(
                scores, expert_ids, shape[0], self.args.num_experts_per_tok, self.sequence_split, counts
            )
            self.aux_terms = (weight, all_prob_sums)  # the value is made when read (`last_aux_loss`)
            # the gradient of aux_loss_coeff * (weight * prob_sums).sum(), as autograd's chain computes it
            out = _AttachAuxLoss.apply(out, prob_sums, weight * self.aux_loss_coeff)
        return out

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        """The aux loss of the last training forward (times its coefficient), made when read: the
        trainer reads it on logging steps only, so the other forwards skip its three ops."""
        if self.aux_terms is None:
            return None
        return self.aux_loss_coeff * aux_loss_value(*self.aux_terms, self.sequence_split.loss_scale)


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then + FFN(norm(x)) with a dense MLP or MoE."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.kernels)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.kernels)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: DocumentMask | None = None
    ) -> torch.Tensor:
        # rope and mask as keywords: tensor-parallel input plans describe the positional x only
        x = x + self.attn(self.attn_norm(x), rope=rope, mask=mask)
        return x + self.ffn(self.ffn_norm(x))


class Moonlight(nn.Module):
    """tokens [B, S] -> logits [B, S, V]. A pipeline stage keeps only its layers: `embed` is None on
    all but the first stage (the input is then hidden states) and `norm`/`lm_head` are None on all but
    the last (the output is then hidden states).

    Packed sequences: ``positions [B, S]`` are the RoPE positions (default 0..S-1 in every row; restart
    them at each document) and ``document_ids [B, S]`` restrict attention to each document (default:
    causal over the whole row; pass them on the host, see `DocumentMask`). Every pipeline stage takes
    both."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        # A dict keyed by the global layer index keeps parameter names stable when stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.num_hidden_layers)})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.kernels)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.lm_head.plain_linear = True  # logits = x @ weight.T: the loss may read the weight (loss.py)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V]. positions / document_ids [B, S]: RoPE positions and packed
        documents (attention stays within a document). return_hidden: the final hidden states [B, S, H]
        instead (after the norm), for `moonlight.model.loss.cross_entropy_from_hidden`; a keyword rather
        than a method so that FSDP's forward hooks run."""
        h = self.embed(tokens) if self.embed is not None else tokens
        mask = DocumentMask(document_ids, h.dtype, h.device) if document_ids is not None else None
        rope = rope_angles(self.args, h.shape[1], positions, h.device)
        for layer in self.layers.values():
            h = layer(h, rope=rope, mask=mask)
        h = self.norm(h) if self.norm is not None else h
        if return_hidden or self.lm_head is None:
            return h
        return self.lm_head(h)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Initialize every parameter and buffer explicitly (after `to_empty` from the meta device):
        matrices ~ N(0, initializer_range), norms 1, router bias and load counters 0."""
        std = self.args.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.init_weights()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (GroupedExperts, Router)):
                module.init_weights(std)
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()
