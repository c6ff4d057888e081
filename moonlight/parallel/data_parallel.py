"""Data parallel (FSDP2 / HSDP) and activation checkpointing.

FSDP2 units: the embedding, each decoder block, the final norm with lm_head, the root, over
``mesh["fsdp"]``; with expert parallel the routed experts get their own unit over
``mesh["expert_fsdp"]``, their gradients divided by the full ``dp x cp`` degree.

Activation checkpointing (``ac_mode``): ``"none"``, ``"selective"`` (each block's attention),
``"full"`` (each block) or ``"op"`` (torchtitan's op-level policy: expensive ops kept, cheap ones
recomputed). Parameter names and state-dict keys do not change. Design: docs/parallelism.md.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import moonlight.kernels.grouped_mm  # noqa: F401  (registers torch.ops.moonlight.grouped_mm, named in SAVED_OPS)
from moonlight.dtypes import is_mixed, to_dtype
from moonlight.model import Block, MoE

AC_MODES = ("none", "selective", "full", "op")

_aten = torch.ops.aten
# Ops whose outputs "op" checkpointing keeps (torchtitan's _save_list, with every matmul kept).
SAVED_OPS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten._grouped_mm.default,
        torch.ops.moonlight.grouped_mm.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_attention_math.default,
        _aten._scaled_dot_product_fused_attention_overrideable.default,
        torch.ops.torch_attn._varlen_attn.default,
        torch.ops._c10d_functional.all_to_all_single.default,
        torch.ops._c10d_functional_autograd.all_to_all_single.default,
        torch.ops._c10d_functional.all_gather_into_tensor.default,  # context parallel's gathered keys
        torch.ops._c10d_functional_autograd.all_gather_into_tensor.default,
    }
)
_IN_PLACE_ROPE = torch.ops.moonlight.rotate_rope_.default
# torch >= 2.13 calls the policy after each op, with its output; older releases (2.11) call it before
# the op, so there a dispatch mode above checkpointing's records the kept outputs (`_KeptOutputs`).
_POLICY_SEES_OUTPUT = "op_output" in inspect.signature(SelectiveCheckpointContext).parameters


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


def _storage_address(t) -> int | None:
    """Where t's memory lives; None for what has none to compare (DTensors, fake tensors, empty ones)."""
    return t.untyped_storage().data_ptr() or None if type(t) is torch.Tensor else None


class _SavePolicy:
    """One checkpointed call's policy: keep the outputs of `SAVED_OPS`, recompute the rest, except
    the in-place RoPE when it rotates a kept output (the q projection's matmul): the recompute gets
    that output back already rotated, and rerunning the rotation would turn it twice. Which RoPE
    calls were kept is decided in the forward (while checkpointing holds every kept output, so their
    addresses are unique) and replayed in order by the recompute, which runs the same ops."""

    def __init__(self):
        self.kept_addresses: set[int] = set()
        self.rope_kept: list[bool] = []
        self.rope_replayed = 0

    def keep(self, output) -> None:
        """Note the storage of a kept op's output (a tensor or a tuple/list of them)."""
        self.kept_addresses.update(
            _storage_address(t) for t in (output if isinstance(output, (tuple, list)) else (output,))
        )
        self.kept_addresses.discard(None)

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in SAVED_OPS:
            if not ctx.is_recompute and _POLICY_SEES_OUTPUT:
                self.keep(ctx.op_output)
            return CheckpointPolicy.MUST_SAVE
        if op == _IN_PLACE_ROPE:
            if ctx.is_recompute:
                keep = self.rope_kept[self.rope_replayed % len(self.rope_kept)]
                self.rope_replayed += 1
            else:
                keep = _storage_address(args[0]) in self.kept_addresses
                self.rope_kept.append(keep)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_RECOMPUTE


class _KeptOutputs(TorchDispatchMode):
    """Above checkpointing's forward mode (torch < 2.13): hands each kept op's output to the policy,
    which sees the ops only before they run."""

    def __init__(self, policy: _SavePolicy):
        super().__init__()
        self.policy = policy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            self.policy.keep(out)
        return out


@contextlib.contextmanager
def _op_level_forward(forward_context, policy: _SavePolicy):
    with forward_context, _KeptOutputs(policy):
        yield


@contextlib.contextmanager
def _op_level_recompute(module: nn.Module, recompute_context):
    with _keep_moe_counters(module), recompute_context:
        yield


def _contexts(module: nn.Module, op_level: bool):
    """(forward, recompute) contexts of one checkpointed call."""
    if not op_level:
        return contextlib.nullcontext(), _keep_moe_counters(module)
    policy = _SavePolicy()
    forward_context, recompute_context = create_selective_checkpoint_contexts(policy)
    if not _POLICY_SEES_OUTPUT:
        forward_context = _op_level_forward(forward_context, policy)
    return forward_context, _op_level_recompute(module, recompute_context)


def _checkpointed_forward(module: nn.Module, op_level: bool, forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if not op_level and not any(isinstance(m, MoE) for m in module.modules()):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)  # torch.compile traces it without context_fn
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: _contexts(module, op_level), **kwargs)


def _checkpoint_module(module: nn.Module, op_level: bool = False):
    if getattr(module, "_moonlight_ac", False):
        return
    forward = module.forward  # the bound class forward
    module.forward = functools.partial(_checkpointed_forward, module, op_level, forward)
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
        _checkpoint_module(block.attn if mode == "selective" else block, op_level=mode == "op")
    return model


# ----------------------------------------------------------------------------------- FSDP2
def apply_fsdp(
    model: nn.Module,
    mesh,
    *,
    param_dtype: str | torch.dtype = "float32",
    reduce_dtype: str | torch.dtype = "float32",
    reshard_after_forward: bool = True,
    ep_enabled: bool = False,
) -> nn.Module:
    """fully_shard the embedding, every block (router included), (with EP) every block's routed
    experts, the final norm with lm_head, then the root; set explicit prefetching between them.

    ``mesh`` is a `ParallelMesh`. Works on a pipeline stage module (missing embed/norm/lm_head)."""
    mp = MixedPrecisionPolicy(param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype))
    mixed = is_mixed(mp.param_dtype, mp.reduce_dtype)
    dims = mesh.dims
    dense_mesh = mesh["fsdp"]
    shard = functools.partial(fully_shard, mesh=dense_mesh, mp_policy=mp)
    if model.embed is not None:
        shard(model.embed, reshard_after_forward=reshard_after_forward)
    blocks, experts_of = list(model.layers.values()), {}
    for block in blocks:
        plain_experts = set()
        if ep_enabled and isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            stored = {p.dtype for p in experts.parameters()}
            if mesh["expert_fsdp"].size() == 1 and not mixed and stored == {mp.param_dtype or torch.float32}:
                # No rank left to shard over and nothing to cast: the experts stay plain EP-sharded
                # parameters outside every unit (a unit would only copy them), their gradients scaled
                # as FSDP would (each sums the tokens of ep token shards; average over all dp x cp shards).
                plain_experts = set(experts.parameters())
                for p in plain_experts:
                    p.register_hook(functools.partial(torch.div, other=float(dims.dp_cp)))
            else:
                _shard_experts(experts, mesh, mp, reshard_after_forward)
                experts_of[block] = experts
        # The router rides with its block: its weight arrives in param_dtype and routing upcasts to
        # fp32 in its forward (as the HF reference does in a bf16 model).
        shard(block, reshard_after_forward=reshard_after_forward, ignored_params=plain_experts or None)
    head = [m for m in (model.norm, model.lm_head) if m is not None]
    if head:
        # Its weights are needed again at the start of backward: never reshard them after forward.
        shard(head, reshard_after_forward=False)
    shard(model, reshard_after_forward=reshard_after_forward)
    _set_prefetch(model.embed, blocks, experts_of, head[0] if head else None)
    return model


def _shard_experts(experts: nn.Module, mesh, mp: MixedPrecisionPolicy, reshard_after_forward: bool) -> None:
    """The routed experts (already Shard(0) on mesh["ep"]) as their own unit over mesh["expert_fsdp"]."""
    dims = mesh.dims
    efsdp = dims.expert_shard
    local_experts = experts.args.n_routed_experts // dims.ep

    def placement(param, _dim=0 if local_experts % efsdp == 0 else 1):
        return Shard(_dim)

    fully_shard(
        experts,
        mesh=mesh["expert_fsdp"],
        mp_policy=mp,
        reshard_after_forward=reshard_after_forward,
        shard_placement_fn=placement,
    )
    # Each expert's gradient sums the tokens of its ep token shards; average over all dp x cp shards.
    experts.set_gradient_divide_factor(float(dims.dp_cp))
    if efsdp > 1:
        # Plain SUM collectives + one division (gloo has no PREMUL_SUM). Not with a size-1 shard
        # group: FSDP2 then divides by the factor twice (copy path + post-divide).
        experts.set_force_sum_reduction_for_comms(True)


def _set_prefetch(embed, blocks, experts_of, head) -> None:
    """Explicit prefetch (as torchtitan): each unit gathers the next one's weights in forward and the
    previous one's in backward. The implicit prefetch cannot see past a host sync (EP's split sizes)."""

    def unit(module):
        return [module] + ([experts_of[module]] if module in experts_of else [])

    order = ([embed] if embed is not None else []) + blocks + ([head] if head is not None else [])
    for current, nxt in zip(order, order[1:]):
        current.set_modules_to_forward_prefetch(unit(nxt))
        nxt.set_modules_to_backward_prefetch(unit(current))
