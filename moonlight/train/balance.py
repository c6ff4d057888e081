"""Aux-loss-free MoE load balancing: after each step every router's expert bias moves by
rate * sign(mean load - load), with the loads summed over every rank that routes tokens through
the same layers; and the load-imbalance metric."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from moonlight.distributed import is_distributed, local_tensor


@torch.no_grad()
def update_router_biases(
    biases: Sequence[Tensor],
    counts: Sequence[Tensor],
    rate: float,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """DeepSeek-V3 aux-loss-free balancing: ``bias += rate * sign(mean(c) - c)`` per layer.

    ``counts[i]`` = tokens routed to each expert of layer i since the last update (int/float
    [E]). The counts of all layers are summed over ``group`` with ONE all-reduce (None = the
    default world; skipped when torch.distributed is not initialized). Pass the group of all
    ranks that see different tokens for these layers (``mesh["routing"]``: dp x cp, and tp when each
    tp rank routes its own sequence shard; exclude pp — each pipeline stage updates its own layers).
    Counts are zeroed in place afterwards (also when rate == 0, which freezes the biases).
    Returns the reduced counts, stacked as float64 [L, E] (or a flat concat when E differs).
    """
    if len(biases) != len(counts):
        raise ValueError("one counts tensor per bias")
    if not counts:
        return torch.empty(0, dtype=torch.float64)
    sizes = [c.numel() for c in counts]
    # a few ops for all layers, not a few per layer (each a kernel launch on a GPU); the int counts are
    # exact in float64, so the means and signs are the same as layer by layer
    flat = torch.cat([local_tensor(c).detach().reshape(-1) for c in counts]).to(torch.float64)
    if is_distributed():
        dev_flat = flat.to(local_tensor(counts[0]).device)
        dist.all_reduce(dev_flat, op=dist.ReduceOp.SUM, group=group)
        flat = dev_flat
    if rate != 0:
        if any(isinstance(b, DTensor) and not all(isinstance(pl, Replicate) for pl in b.placements) for b in biases):
            raise ValueError("router bias must be replicated")
        locals_ = [local_tensor(b) for b in biases]
        if len(set(sizes)) == 1:
            by_layer = flat.view(len(sizes), sizes[0])
            delta = torch.sign(by_layer.mean(dim=-1, keepdim=True) - by_layer).reshape(-1)
        else:
            delta = torch.cat([torch.sign(c.mean() - c) for c in flat.split(sizes)])
        delta = delta.to(device=locals_[0].device, dtype=locals_[0].dtype)  # -1, 0 or 1: exact in any dtype
        torch._foreach_add_(locals_, [d.view_as(b) for d, b in zip(delta.split(sizes), locals_)], alpha=rate)
    torch._foreach_zero_([local_tensor(c) for c in counts])
    if len(set(sizes)) == 1:
        return flat.view(len(sizes), sizes[0])
    return flat


def expert_load_imbalance(counts: Tensor) -> Tensor:
    """max/mean of expert load over the last dim ([E] -> scalar, [L, E] -> [L]); 1.0 where no
    tokens were routed (mean 0)."""
    c = counts.float()
    mean = c.mean(dim=-1)
    mx = c.amax(dim=-1)
    return torch.where(mean > 0, mx / mean.clamp(min=1e-30), torch.ones_like(mean))
