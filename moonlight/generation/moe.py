"""The MoE layer for a few tokens (decode): each token's top-k experts' weights are indexed and its
matmuls batched, with no sort, permutation or group sizes.

For a handful of tokens the training path's permute and grouped GEMM cost more launches than
FLOPs. Here every (token, expert) pair is one batched matrix-vector product against
`weight[expert_ids]`; inductor, with coordinate-descent tuning on CUDA, turns such a batched
product with one row into a reduction that reads the indexed weights in place (no gathered copy).
Past `tokens * top_k > n_routed_experts` pairs, experts repeat and the training path's experts (permute,
grouped GEMM), which read each chosen expert once, are taken instead.
"""

from __future__ import annotations

import torch

from moonlight.model import GroupedExperts, MoE
from moonlight.model.model import swiglu


def gathered_experts(
    experts: GroupedExperts, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """x [T, H], expert_ids / weights [T, K] -> sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) [T, H],
    combined in fp32 as the training path's unpermute does."""
    t, k = expert_ids.shape
    gate, up, down = experts.gate_proj[expert_ids], experts.up_proj[expert_ids], experts.down_proj[expert_ids]
    rows = x[:, None, :]  # [T, 1, H]: one row against the K experts' stacked [K * I, H]
    g = torch.bmm(rows, gate.flatten(1, 2).transpose(1, 2)).view(t, k, -1)
    u = torch.bmm(rows, up.flatten(1, 2).transpose(1, 2)).view(t, k, -1)
    act = swiglu(g, u).view(t * k, 1, -1)  # [T * K, 1, I] against each pair's [H, I]
    y = torch.bmm(act, down.flatten(0, 1).transpose(1, 2)).view(t, k, -1)
    compute_dtype = torch.promote_types(y.dtype, torch.float32)
    return torch.bmm(weights.to(compute_dtype).unsqueeze(1), y.to(compute_dtype)).squeeze(1).to(x.dtype)


def uses_gathered_experts(moe: MoE, tokens: int) -> bool:
    """Whether `moe_decode` indexes experts for this many tokens (else it runs the training path)."""
    return tokens * moe.args.num_experts_per_tok <= moe.args.n_routed_experts


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's forward for inference, x [..., H]: gathered experts for few tokens, else the
    training path's experts; the trainer's load counters are left alone."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, expert_ids, _ = moe.router(flat)
    if uses_gathered_experts(moe, flat.shape[0]):
        out = gathered_experts(moe.experts, flat, expert_ids, weights)
    else:
        out = moe.experts(flat, expert_ids, weights)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(shape)
