"""Multi-rank layouts: validate the degrees, build the meshes, split pipeline stages, apply the
parallel plans, and tell the loop how to compute and reduce the loss."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.parallel import ParallelDims, build_mesh, cross_entropy_loss, parallelize_model
from moonlight.parallel.pipeline import build_pipeline_stages, build_schedule, pipeline_step, resolve_layout
from moonlight.train.config import JobConfig
from moonlight.train.layout import Layout


class Pipeline:
    """One pipeline step per call: every micro-batch's loss is sum(CE) / tokens-per-optimizer-step, so
    the contributions of all micro-batches and accumulation steps add up to this rank's mean loss."""

    def __init__(self, schedule, tokens_per_step: int):
        self.schedule = schedule
        self.tokens_per_step = tokens_per_step

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return pipeline_step(self.schedule, inputs, labels, num_tokens=self.tokens_per_step)


def build_parallel_layout(cfg: JobConfig, args: ModelArgs, world_size: int, device: torch.device,
                          init_full_model: Callable[[], Moonlight]) -> Layout:
    p, t = cfg.parallelism, cfg.training
    dims = ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, ep=p.ep, pp=p.pp,
                        world_size=world_size)
    vp = p.pp_virtual_stages
    pp_layout = resolve_layout(p.pp_layout or None, args, p.pp, vp) if p.pp > 1 else None
    sequence_parallel = p.sequence_parallel and p.tp > 1
    dims.validate(args, pp_layout, vp, sequence_parallel=sequence_parallel, seq_len=t.seq_len)
    mesh = build_mesh(dims, device.type)
    full = init_full_model()
    seed = t.seed

    def prepare(module: nn.Module, stage: int = 0) -> nn.Module:
        on_meta = next(module.parameters()).is_meta
        if not on_meta:
            module.to(device)
        parallelize_model(module, dims, mesh, sequence_parallel=sequence_parallel,
                          ac_mode=cfg.activation_checkpoint.mode, param_dtype=t.mixed_precision_param,
                          reduce_dtype=t.mixed_precision_reduce, reshard_after_forward=p.fsdp_reshard_after_forward)
        if on_meta:  # too large to initialise whole: each rank initialises its shards
            module.to_empty(device=device)
            torch.manual_seed(seed + stage)
            module.init_weights()
        return module

    tp_rank = mesh.tp_rank
    common = dict(dp_rank=mesh.dp_rank, dp_world=mesh.dp_size, moe_count_group=mesh["dp"].get_group(),
                  replica_mesh=mesh.world["dp_replicate", "dp_shard", "tp"],
                  description=dims.describe() + (" + sequence parallel" if sequence_parallel else ""))
    if p.pp == 1:
        return Layout(model_parts=[prepare(full)], loss_fn=cross_entropy_loss, holds_loss=tp_rank == 0, **common)

    # Each local stage starts from its own copy of the full model (identical initial weights in every layout).
    build_fn = (lambda _: copy.deepcopy(full)) if not next(full.parameters()).is_meta else None
    stages, parts = build_pipeline_stages(args, pp_layout, mesh["pp"], device, schedule=p.pp_schedule,
                                          build_fn=build_fn, parallelize_fn=prepare)
    n_micro = p.pp_microbatches or t.local_batch_size
    schedule = build_schedule(stages, p.pp_schedule, n_micro, cross_entropy_loss, scale_grads=False,
                              local_batch_size=t.local_batch_size)
    dp_world = mesh.dp_size
    tokens_per_step = t.global_batch_size // dp_world * t.seq_len
    holds_last = any(s.is_last for s in stages)
    layout = Layout(model_parts=parts, pipeline=Pipeline(schedule, tokens_per_step), loss_fn=cross_entropy_loss,
                    pp_group=mesh["pp"].get_group(), holds_loss=holds_last and tp_rank == 0,
                    microbatches_per_step=n_micro, **common)
    layout.description += f", pipeline {p.pp_schedule} layout {pp_layout} x {n_micro} micro-batches"
    return layout
