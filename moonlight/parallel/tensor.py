"""Tensor parallel (Megatron-style) and sequence parallel plans, and a loss for vocab-sharded logits.

- Attention: q/kv_b projections column-parallel (whole heads per rank), ``o_proj`` row-parallel;
  the latent projections and norms stay replicated.
- Dense MLP and shared experts: gate/up column-, down row-parallel. Routed experts and the router
  are not split by tp: each tp rank routes all its replica's tokens, or with sequence-local routing
  only its own sequence shard (`SequenceShards`).
- Embedding vocab-parallel; ``lm_head`` column-parallel, its logits left sharded for
  `cross_entropy_loss`. Sequence parallel keeps the residual stream as the local ``[b, s/tp, h]``.
Design: docs/parallelism.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moonlight.dtypes import at_least_fp32
from moonlight.model import MLP, MoE


class _AllReduceGradTail(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the last-dim channels [start:] of the gradient
    over the tp group and leaves the rest as is."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tail = grad[..., ctx.start :].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., ctx.start :] = tail
        return grad, None, None


def _reduce_rope_key_grad(kv_a_proj: nn.Module, start: int, tp_mesh: DeviceMesh):
    """The rope key k_pe (kv_a_proj's output channels [kv_lora_rank:]) is shared by every head, but
    each tp rank only backpropagates through its own heads: sum that part of the gradient over tp.
    (The latent part needs nothing: kv_b_proj's column-parallel input already all-reduces it.)"""
    group = tp_mesh.get_group()

    def hook(module, args, output):
        return _AllReduceGradTail.apply(output, start, group)

    kv_a_proj.register_forward_hook(hook)


class SequenceShards:
    """`MoE.sequence_split` when this rank's MoE input is one part of every sequence of its data replica,
    the other parts on the ranks of ``parts_mesh``: context parallel's cp ranks, times the tp ranks
    under sequence-local routing (see `moonlight.model.model.WholeSequences`). ``weight_mesh``: the
    ranks among them whose router-weight gradients data parallel does not reduce (tp), summed here;
    ``loss_scale``: the ranks among them whose gradients data parallel averages (cp)."""

    def __init__(self, parts_mesh: DeviceMesh, weight_mesh: DeviceMesh | None = None, loss_scale: int = 1):
        self.group = parts_mesh.get_group()
        self.shards = parts_mesh.size()
        self.weight_group = weight_mesh.get_group() if weight_mesh is not None and weight_mesh.size() > 1 else None
        self.loss_scale = loss_scale

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", self.group))

    def shared_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_group is None else _AllReduceGradTail.apply(w, 0, self.weight_group)


def _block_plan(block: nn.Module, sequence_parallel: bool, sequence_local_routing: bool) -> dict:
    act = Shard(1) if sequence_parallel else Replicate()
    attn = block.attn
    plan = {}
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel(use_local_output=True)
        plan["ffn_norm"] = SequenceParallel(use_local_output=True)
        plan["attn"] = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    plan["attn.q_proj" if hasattr(attn, "q_proj") else "attn.q_b_proj"] = ColwiseParallel()
    plan["attn.kv_b_proj"] = ColwiseParallel()
    plan["attn.o_proj"] = RowwiseParallel(output_layouts=act)
    ffn = block.ffn
    if isinstance(ffn, MLP):
        if sequence_parallel:
            plan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
        plan["ffn.gate_proj"] = ColwiseParallel()
        plan["ffn.up_proj"] = ColwiseParallel()
        plan["ffn.down_proj"] = RowwiseParallel(output_layouts=act)
    elif isinstance(ffn, MoE):
        shared_rows = Replicate()
        if sequence_local_routing:
            # The MoE layer keeps this rank's [b*s/tp, h] token rows; only the shared experts gather
            # every rank's rows (dim 0, in rank order) and reduce-scatter their output back.
            shared_rows = Shard(0)
            if ffn.shared_experts is not None:
                plan["ffn.shared_experts"] = PrepareModuleInput(
                    input_layouts=(shared_rows,), desired_input_layouts=(Replicate(),), use_local_output=True
                )
        elif sequence_parallel:
            # The router and the routed experts see every token of the sequence on each tp rank.
            plan["ffn"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            )
        if ffn.shared_experts is not None:
            plan["ffn.shared_experts.gate_proj"] = ColwiseParallel()
            plan["ffn.shared_experts.up_proj"] = ColwiseParallel()
            plan["ffn.shared_experts.down_proj"] = RowwiseParallel(output_layouts=shared_rows)
    else:
        raise TypeError(f"unknown feed-forward module {type(ffn).__name__}")
    return plan


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False, sequence_local_routing: bool = False
) -> nn.Module:
    """Apply the TP (+SP) plan in place to a Moonlight model or one pipeline stage of it (``embed``,
    ``norm``, ``lm_head`` may be None, ``layers`` may hold a subset). Call before FSDP (and before
    expert parallel, which ``sequence_local_routing`` needs: see the module docstring)."""
    if tp_mesh.size() == 1:
        return model
    if sequence_local_routing and not sequence_parallel:
        raise ValueError(
            "sequence_local_routing needs sequence_parallel: the MoE input is then the local sequence shard"
        )
    act = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if getattr(model, "embed", None) is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=act)
    if getattr(model, "norm", None) is not None and sequence_parallel:
        top["norm"] = SequenceParallel(use_local_output=True)
    if getattr(model, "lm_head", None) is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=act, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel, sequence_local_routing))
        _reduce_rope_key_grad(block.attn.kv_a_proj, block.attn.args.kv_lora_rank, tp_mesh)
    return model


# ---------------------------------------------------------------------------------------- loss
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy from vocab shards: local logits [N, V/tp] (this rank holds vocab ids
    [start, start + V/tp)), labels [N] (global ids, the same on every tp rank). Returns the sum of
    per-token losses over valid tokens (identical on every tp rank). Three small all-reduces of [N]."""

    @staticmethod
    def forward(ctx, local_logits, labels, vocab_start, group, ignore_index):
        x = at_least_fp32(local_logits)
        with torch.no_grad():
            row_max = x.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        x = x - row_max.unsqueeze(-1)
        exp = x.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        valid = labels != ignore_index
        local_ids = labels - vocab_start
        here = valid & (local_ids >= 0) & (local_ids < x.shape[-1])
        local_ids = torch.where(here, local_ids, torch.zeros_like(local_ids))
        target = torch.where(here, x.gather(-1, local_ids.unsqueeze(-1)).squeeze(-1), torch.zeros_like(sum_exp))
        dist.all_reduce(target, group=group)
        loss = torch.where(valid, sum_exp.log() - target, torch.zeros_like(target))
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_ids, here, valid)
        ctx.in_dtype = local_logits.dtype
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        softmax, local_ids, here, valid = ctx.saved_tensors
        g = softmax
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows[here], local_ids[here]] -= 1.0
        g.mul_(valid.unsqueeze(-1).to(g.dtype) * grad)
        return g.to(ctx.in_dtype), None, None, None, None


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level cross-entropy for plain logits ``[..., V]`` or vocab-sharded ``Shard(-1)`` DTensor
    logits from the TP lm_head (computed shard-wise: full logits are never gathered). ``labels``
    has the logits' leading shape (already shifted), entries ``ignore_index`` are skipped.

    reduction="mean": sum over valid tokens / (``num_tokens`` if given, else the local valid count);
    pass the global valid-token count divided by the dp size when ranks may hold different numbers of
    valid tokens, so FSDP's gradient average gives the exact global mean. "sum": the plain sum.
    Returns a plain scalar tensor (the same on every tp rank).
    """
    labels = labels.reshape(-1)
    if isinstance(logits, DTensor):
        placements = logits.placements
        if (
            logits.device_mesh.ndim == 1
            and isinstance(placements[0], Shard)
            and placements[0].dim in (-1, logits.ndim - 1)
        ):
            local = logits.to_local()
            local = local.reshape(-1, local.shape[-1])
            tp = logits.device_mesh
            vocab_per_rank = logits.shape[-1] // tp.size()
            if logits.shape[-1] % tp.size():
                raise ValueError(f"vocab {logits.shape[-1]} is not divisible by tp={tp.size()}")
            total = _VocabParallelCrossEntropy.apply(
                local, labels, tp.get_local_rank() * vocab_per_rank, tp.get_group(), ignore_index
            )
        else:
            logits = logits.full_tensor()
            total = F.cross_entropy(
                at_least_fp32(logits.reshape(-1, logits.shape[-1])), labels, ignore_index=ignore_index, reduction="sum"
            )
    else:
        total = F.cross_entropy(
            at_least_fp32(logits.reshape(-1, logits.shape[-1])), labels, ignore_index=ignore_index, reduction="sum"
        )
    return reduce_token_losses(total, labels, ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens)


def reduce_token_losses(
    total: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`cross_entropy_loss`'s reduction of a summed token loss, e.g. of `cross_entropy_from_hidden`
    (the chunked loss from hidden states, for heads that are not vocab-sharded)."""
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_tokens is None:
        num_tokens = (labels != ignore_index).sum().clamp(min=1)
    return total / num_tokens
