"""From the [parallelism] config to model parts on this rank, plus what the loop needs to know about
the layout: data-parallel coordinates, the loss function, the pipeline schedule, the groups that
reduce losses and expert counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.parallel.tensor import cross_entropy_loss
from moonlight.train.config import JobConfig


@dataclass
class Layout:
    model_parts: list[nn.Module]
    dp_rank: int = 0
    dp_world: int = 1
    pipeline: object | None = None  # has .step(inputs, labels) -> loss on the last stage, else None
    loss_fn: Callable = cross_entropy_loss
    microbatches_per_step: int = 1  # pipeline micro-batches per forward/backward call
    pp_group: dist.ProcessGroup | None = None
    moe_count_group: dist.ProcessGroup | None = None  # every rank that routes tokens through the same layers
    replica_mesh: DeviceMesh | None = None  # ranks holding copies of a weight its own mesh lacks (Muon's replicas)
    holds_loss: bool = True  # this rank's loss counts once in the reported mean (last stage, tp rank 0)
    description: str = "single process"
    extras: dict = field(default_factory=dict)

    def describe(self) -> str:
        return self.description

    def reduce_loss(self, local_loss: torch.Tensor) -> float:
        """The step's mean loss as every rank agrees on it."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return float(local_loss)
        held = torch.stack([local_loss.float() * self.holds_loss,
                            torch.tensor(float(self.holds_loss), device=local_loss.device)])
        dist.all_reduce(held)
        return float(held[0] / held[1]) if held[1] > 0 else math.nan


def build_layout(cfg: JobConfig, args: ModelArgs, world_size: int, device: torch.device,
                 init_full_model: Callable[[], Moonlight]) -> Layout:
    p = cfg.parallelism
    if world_size == 1 and p.tp == p.ep == p.pp == p.dp_replicate == 1 and p.dp_shard in (-1, 1):
        model = init_full_model()
        if next(model.parameters()).is_meta:  # too large to initialise on the CPU first
            model.to_empty(device=device)
            torch.manual_seed(cfg.training.seed)
            model.init_weights()
        else:
            model.to(device)
        _apply_activation_checkpointing(model, cfg.activation_checkpoint.mode)
        return Layout(model_parts=[model])
    from moonlight.train.parallel_layout import build_parallel_layout

    return build_parallel_layout(cfg, args, world_size, device, init_full_model)


def _apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    from moonlight.parallel.data import apply_activation_checkpointing

    apply_activation_checkpointing(model, mode)
