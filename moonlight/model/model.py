"""Moonlight-16B-A3B: DeepSeek-V3 architecture (MLA attention + sigmoid-routed MoE), in one file.

The model is pure compute: no torch.distributed imports. Parallel plans in `moonlight.parallel`
are applied to a built model by module name, and the expert-parallel plan swaps the experts'
`dispatcher` (see `LocalDispatcher`). Build on the meta device and call `init_weights()` to plan a
16B model without allocating it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import apply_mla_rope, permute_tokens, resolve_impl, rope_tables, unpermute_tokens
from kernels.grouped_mm import grouped_linear
from moonlight.config import ModelArgs



def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (expert parallel shards experts), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class RMSNorm(nn.Module):
    """Normalise in fp32, scale in the input dtype (as the HF reference does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def init_weights(self):
        nn.init.ones_(self.weight)


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
            self.q_norm = RMSNorm(args.q_lora_rank, args.latent_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, heads * args.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(h, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.latent_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * args.v_head_dim, h, bias=False)
        self.softmax_scale = args.qk_head_dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x) if a.q_lora_rank is None else self.q_b_proj(self.q_norm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, -1, a.qk_head_dim)  # -1: heads held by this rank under tensor parallel
        latent, k_pe = self.kv_a_proj(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        cos, sin = rope_tables(seqlen, a.qk_rope_head_dim, a.rope_theta, x.device)
        q, k_pe = apply_mla_rope(q, k_pe, cos, sin, impl=resolve_impl(a.kernels, x.device))

        kv = self.kv_b_proj(self.kv_norm(latent)).view(bsz, seqlen, -1, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        # Fused (flash) SDPA kernels want one head size for q, k and v: pad v with zero channels and
        # drop them after (the math fallback for unequal sizes is ~3x slower on CPU).
        v_pad = a.qk_head_dim - a.v_head_dim
        if v_pad > 0:
            v = F.pad(v, (0, v_pad))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.softmax_scale)
        out = out[..., : a.v_head_dim] if v_pad > 0 else out
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layer(s) and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid top-k router with aux-loss-free balancing: `expert_bias` steers which experts are
    chosen but never the weights they are combined with. The bias is a buffer (not learned by
    gradient); the trainer nudges it after each step from the expert loads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] fp32, expert ids [T, K], scores [T, E] fp32)."""
        a = self.args
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.expert_bias
        if a.n_group > 1:  # keep the topk_group groups whose two best biased scores sum highest
            grouped = biased.view(-1, a.n_group, a.n_routed_experts // a.n_group)
            best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(a.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        expert_ids = biased.topk(a.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * a.routed_scaling_factor, expert_ids, scores

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


def grouped_mm_alignment(x: torch.Tensor) -> int:
    """Rows per expert group are padded to a multiple of this: the GPU grouped GEMM wants 16-byte
    aligned group boundaries (8 bf16 rows, as torchtitan pads); the CPU path takes any size."""
    return 8 if x.is_cuda and uses_grouped_mm(x) else 1


class LocalDispatcher:
    """Moves token copies to the experts of this process and back. Expert parallel replaces it with
    an all-to-all dispatcher of the same two methods."""

    def __init__(self, align: int | None = None):
        self.align = align  # rows per expert padded to a multiple of this; None: what the GEMM wants

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, impl: str):
        """-> (rows [N, H] grouped by local expert, rows per local expert [E_local], state for combine)."""
        align = grouped_mm_alignment(x) if self.align is None else self.align
        rows, counts, row_index = permute_tokens(x, expert_ids, num_experts, align=align, impl=impl)
        return rows, counts, row_index

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state, impl: str) -> torch.Tensor:
        return unpermute_tokens(y, state, weights, impl=impl)


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert on its contiguous group of rows. x [N, H]; counts [E]; gate/up [E, I, H];
    down [E, H, I]."""
    if uses_grouped_mm(x):
        offs = counts.cumsum(0).to(torch.int32)
        g, u = grouped_linear(x, gate, offs), grouped_linear(x, up, offs)
        return grouped_linear(F.silu(g) * u, down, offs)
    outs = []
    for e, rows in enumerate(x.split(counts.tolist())):
        outs.append(F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]))
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
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.args.kernels, x.device)
        gate, up, down = _local(self.gate_proj), _local(self.up_proj), _local(self.down_proj)
        rows, counts, state = self.dispatcher.dispatch(x, expert_ids, self.args.n_routed_experts, impl)
        y = grouped_swiglu(rows, counts, gate, up, down)
        return self.dispatcher.combine(y, weights, state, impl)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the MoE output whose backward also sends gradient 1 into the aux loss, so the
    balance loss trains the router without threading it through the model's outputs (which pipeline
    stages could not do)."""

    @staticmethod
    def forward(ctx, out, aux_loss):
        ctx.save_for_backward(aux_loss)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (aux_loss,) = ctx.saved_tensors
        return grad_out, torch.ones_like(aux_loss)


def sequence_aux_loss(scores: torch.Tensor, expert_ids: torch.Tensor, bsz: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i * P_i, averaged over sequences.
    P_i: mean over the sequence of the sigmoid scores normalised over all experts; f_i: the fraction
    of the sequence's routing choices that picked expert i, times E / K."""
    num_experts = scores.shape[-1]
    probs = (scores / scores.sum(-1, keepdim=True)).view(bsz, -1, num_experts)
    seqlen = probs.shape[1]
    picks = torch.zeros(bsz, num_experts, device=scores.device, dtype=scores.dtype)
    picks.scatter_add_(1, expert_ids.view(bsz, -1), torch.ones_like(expert_ids.view(bsz, -1), dtype=scores.dtype))
    f = picks * num_experts / (top_k * seqlen)
    return (f * probs.mean(1)).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts (weighted by the router) plus one shared SwiGLU MLP applied to every token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.router = Router(args)
        self.experts = GroupedExperts(args)
        self.shared_experts = (MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size)
                               if args.n_shared_experts else None)
        # Token choices per expert since the trainer last read them (for the bias update and metrics).
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts), persistent=False)
        self.aux_loss_coeff = args.aux_loss_alpha if args.seq_aux else 0.0
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, expert_ids, scores = self.router(x)
        with torch.no_grad():
            self.tokens_per_expert += torch.bincount(expert_ids.flatten(), minlength=self.args.n_routed_experts)
        out = self.experts(x, expert_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        out = out.view(shape)
        if self.training and self.aux_loss_coeff > 0 and torch.is_grad_enabled():
            aux = self.aux_loss_coeff * sequence_aux_loss(scores, expert_ids, shape[0], self.args.num_experts_per_tok)
            self.last_aux_loss = aux.detach()
            out = _AttachAuxLoss.apply(out, aux)
        return out


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then + FFN(norm(x)) with a dense MLP or MoE."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Moonlight(nn.Module):
    """tokens [B, S] -> logits [B, S, V]. A pipeline stage keeps only its layers: `embed` is None on
    all but the first stage (the input is then hidden states) and `norm`/`lm_head` are None on all but
    the last (the output is then hidden states)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        # A dict keyed by the global layer index keeps parameter names stable when stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.num_hidden_layers)})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) if self.embed is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.lm_head(h) if self.lm_head is not None else h

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Initialise every parameter and buffer explicitly (after `to_empty` from the meta device):
        matrices ~ N(0, initializer_range), norms 1, router bias and load counters 0."""
        std = self.args.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.init_weights()
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, GroupedExperts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(p, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()
