"""Data parallel (FSDP2 / HSDP) and activation checkpointing.

FSDP2: one `fully_shard` unit per decoder block plus the root module (embedding, final norm,
lm_head), over ``mesh["fsdp"]`` (``dp_shard``; ``(dp_replicate, dp_shard)`` for HSDP). With expert
parallel the routed experts (``block.ffn.experts``, already ``Shard(0)`` on ``mesh["ep"]``) get
their own unit over ``mesh["expert_fsdp"]`` (``dp_shard // ep`` [x ``dp_replicate``]) and their
gradients are divided by the full data-parallel degree (each expert's gradient sums the tokens of
``ep`` data shards, see `moonlight.parallel.mesh`). With a low-precision ``param_dtype`` each
MoE router is its own fp32 unit (routing is decided in fp32, like the reference's fp32 gate).

Activation checkpointing (``ac_mode``):
- ``"none"``.
- ``"selective"``: the attention (``block.attn``: q/kv projections, RoPE, SDPA, o_proj) of every
  block is recomputed in backward; the norms, the MLP/MoE and the residual stream keep their
  activations. Attention holds most of the per-token activation memory of an MLA block (q, k, v
  per head and the SDPA state) while MoE recompute would repeat the token dispatch.
- ``"full"``: each whole Block is recomputed (torch.utils.checkpoint, use_reentrant=False); only
  block inputs are kept.
Checkpointing replaces the module's ``forward`` on the instance, so parameter names and state-dict
keys do not change. The MoE load counters (``tokens_per_expert``) are restored after a recompute,
so a checkpointed MoE counts each token once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.utils.checkpoint import checkpoint

from moonlight.dtypes import to_dtype
from moonlight.model import Block, MoE

AC_MODES = ("none", "selective", "full")


# ----------------------------------------------------------------------- activation checkpointing
@contextlib.contextmanager
def _keep_moe_counters(module: nn.Module):
    """Recompute context: undo the load-counter increments a recomputed MoE forward makes."""
    moes = [m for m in module.modules() if isinstance(m, MoE)]
    saved = [m.tokens_per_expert.clone() for m in moes]
    try:
        yield
    finally:
        for m, s in zip(moes, saved):
            m.tokens_per_expert.copy_(s)


def _checkpointed_forward(module: nn.Module, forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if not any(isinstance(m, MoE) for m in module.modules()):  # torch.compile traces checkpoints without context_fn
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _keep_moe_counters(module)), **kwargs)


def _checkpoint_module(module: nn.Module):
    if getattr(module, "_moonlight_ac", False):
        return
    forward = module.forward  # the bound class forward
    module.forward = functools.partial(_checkpointed_forward, module, forward)
    module._moonlight_ac = True


def apply_activation_checkpointing(model: nn.Module, mode: str = "none") -> nn.Module:
    """Checkpoint the blocks of a model or pipeline stage in place; see the module docstring."""
    if mode not in AC_MODES:
        raise ValueError(f"ac_mode={mode!r}: choose one of {AC_MODES}")
    if mode == "none":
        return model
    for block in model.layers.values():
        if not isinstance(block, Block):
            raise TypeError(f"expected decoder Blocks in model.layers, found {type(block).__name__}")
        _checkpoint_module(block if mode == "full" else block.attn)
    return model


# ----------------------------------------------------------------------------------- FSDP2
def apply_fsdp(model: nn.Module, mesh, *, param_dtype: str | torch.dtype = "float32",
               reduce_dtype: str | torch.dtype = "float32", reshard_after_forward: bool = True,
               ep_enabled: bool = False) -> nn.Module:
    """fully_shard every block, (with EP) every block's routed experts, then the root module.

    ``mesh`` is a `ParallelMesh`. Works on a pipeline stage module (missing embed/norm/lm_head)."""
    mp = MixedPrecisionPolicy(param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype))
    dims = mesh.dims
    dense_mesh = mesh["fsdp"]
    for block in model.layers.values():
        if ep_enabled and isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            expert_mesh = mesh["expert_fsdp"]
            efsdp = mesh["dp_shard_mod_ep"].size()
            local_experts = block.ffn.args.n_routed_experts // dims.ep

            def placement(param, _dim=0 if local_experts % efsdp == 0 else 1):
                return Shard(_dim)

            fully_shard(experts, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=placement)
            # Each expert's gradient sums the tokens of its ep data shards; average over all dp shards.
            experts.set_gradient_divide_factor(float(dims.dp))
            if efsdp > 1:
                # Plain SUM collectives + one division (gloo has no PREMUL_SUM). Not with a size-1 shard
                # group: torch 2.13's FSDP2 then divides by the factor twice (copy path + post-divide).
                experts.set_force_sum_reduction_for_comms(True)
        if isinstance(block.ffn, MoE) and mp.param_dtype not in (None, torch.float32):
            # Routing is decided in fp32 (as the reference keeps gate.weight fp32 in a bf16 model):
            # gather the router weight in fp32, reduce its gradient in fp32.
            fully_shard(block.ffn.router, mesh=dense_mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
