"""The one entry point that turns a built Moonlight (or one pipeline stage of it) into its parallel form."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from moonlight.dtypes import is_mixed
from moonlight.errors import ParallelConfigError
from moonlight.model import MoE
from moonlight.parallel.context import apply_context_parallel
from moonlight.parallel.data_parallel import AC_MODES, apply_activation_checkpointing, apply_fsdp
from moonlight.parallel.expert import apply_expert_parallel
from moonlight.parallel.mesh import ParallelDims, ParallelMesh
from moonlight.parallel.tensor import SequenceShards, apply_tensor_parallel


def quiet_tp_fsdp_warnings() -> None:
    """Two PyTorch warnings that TP x FSDP meets once per rank, about risks this code does not take:
    - FSDP's "returned a view tensor": the vocab-parallel embedding's output is a view of its DTensor's
      local tensor; nothing writes to it in place (the blocks add residuals out of place), so FSDP's
      pre-backward hook runs.
    - DTensor's "sequential ... operations ... inconsistent results between ranks": the gradient norm of
      a (dp_shard, tp) DTensor is reduced over one mesh dim, then the other; every rank of a clip gets
      the same total to fp32 rounding, and the step is the single process's.
    Both are proven by tests/multirank/test_parallel_tp_fsdp.py::test_hsdp_and_fsdp_x_tp_four_ranks (fsdp2 x tp2:
    one step's loss and gathered gradients equal the single process's) and
    tests/multirank/test_train_parallelisms.py::test_parallel_losses_and_weights_equal_single_process (dp_shard 2 x tp2:
    losses, grad norms and final weights of a training run)."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    redistribute = logging.getLogger("torch.distributed.tensor._redistribute")  # logged, not warnings.warn
    if not any(f is _drop_norm_partial_notice for f in redistribute.filters):
        redistribute.addFilter(_drop_norm_partial_notice)


def _drop_norm_partial_notice(record: logging.LogRecord) -> bool:
    """False (drop) for DTensor's notice about reducing a gradient norm over two mesh dims in turn."""
    return not ("While redistributing" in str(record.msg) and "_NormPartial" in record.getMessage())


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh,
    *,
    sequence_parallel: bool = False,
    ac_mode: str = "none",
    param_dtype: str | torch.dtype = "float32",
    reduce_dtype: str | torch.dtype = "float32",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply, in place and in this order: TP/SP -> EP -> CP -> activation checkpointing -> FSDP2/HSDP.

    ``model``: a Moonlight on any device (meta included: then ``to_empty`` + ``init_weights`` or
    `load_hf_sharded` afterwards), or a pipeline stage module of it (``embed``/``norm``/``lm_head``
    None, ``layers`` a subset). Pipeline splitting must already have happened.
    ``dims`` must be the degrees ``mesh`` was built from; it is validated against ``model.args``
    (pipeline layout checks are the caller's: ``dims.validate(args, pp_layout, vp, ...)``).
    FSDP is applied when the data- or context-parallel degree is above 1 (it reduces the gradients
    over ``mesh["fsdp"]``, dp_shard x cp), when EP spanning TP leaves several ranks per expert shard
    (e.g. tp=4, ep=2), or when param_dtype/reduce_dtype ask for mixed precision; pure TP/EP fp32 runs
    keep their parameters as TP/EP DTensors (or plain). Under sequence-local routing every MoE layer
    gets the `SequenceShards` of its sequence's parts over cp x tp (context parallel alone: over cp).
    Returns the model.
    """
    if ac_mode not in AC_MODES:
        raise ValueError(f"ac_mode={ac_mode!r}: choose one of {AC_MODES}")
    dims.validate(model.args, sequence_parallel=sequence_parallel)
    if mesh.dims != dims:
        raise ValueError(f"the mesh was built for {mesh.dims.describe()}, not {dims.describe()}")
    if dims.tp > 1:
        apply_tensor_parallel(
            model, mesh["tp"], sequence_parallel=sequence_parallel, sequence_local_routing=dims.ep_spans_tp
        )
    if dims.ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    if dims.cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if dims.ep_spans_tp:  # each tp rank routes its own shard of its (context-parallel slice of a) sequence
        shards = SequenceShards(mesh["sequence_parts"], weight_mesh=mesh["tp"], loss_scale=dims.cp)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.sequence_split = shards
    mixed = is_mixed(param_dtype, reduce_dtype)
    if ac_mode == "op" and dims.ep > 1 and (dims.dp_replicate * dims.expert_shard > 1 or mixed):
        raise ParallelConfigError(
            "activation_checkpoint.mode = 'op' does not work with expert parallel when the experts are "
            "sharded or cast by FSDP (a PyTorch FSDP/selective-checkpoint bug, pytorch/torchtitan#3427): use "
            "mode 'selective' or 'full', or fp32 with one rank per expert shard (dp_replicate = 1 and "
            "dp_shard x cp = ep, or dp_shard x cp x tp = ep when expert parallel spans tp)"
        )
    apply_activation_checkpointing(model, ac_mode)
    if dims.dp_cp > 1 or dims.expert_shard > 1 or mixed:
        if dims.tp > 1:
            quiet_tp_fsdp_warnings()
        apply_fsdp(
            model,
            mesh,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=reshard_after_forward,
            ep_enabled=dims.ep > 1,
        )
    return model
