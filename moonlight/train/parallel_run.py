"""From the [parallelism] config to this rank's `ParallelRun`: its model parts, plus what the loop needs
to know about the parallelism: data- and context-parallel coordinates (and the slice of each batch this
rank keeps), the loss function, the pipeline schedule, and the groups that reduce losses and expert
counts. One process and every multi-rank configuration go through `build_parallel_run`."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moonlight.config import ModelArgs
from moonlight.distributed import init_single_process_group, to_device
from moonlight.dtypes import is_mixed
from moonlight.model import Moonlight
from moonlight.model.loss import cross_entropy_from_hidden
from moonlight.parallel.mesh import ParallelDims, build_mesh
from moonlight.parallel.parallelize import parallelize_model
from moonlight.parallel.tensor import cross_entropy_loss, reduce_token_losses
from moonlight.parallel.compile import apply_compile
from moonlight.parallel.context import zigzag_slice
from moonlight.parallel.data_parallel import apply_activation_checkpointing
from moonlight.parallel.pipeline import build_pipeline_stages, build_schedule, hidden_states_loss, pipeline_step
from moonlight.parallel.pipeline_layout import resolve_layout
from moonlight.train.config import JobConfig
from moonlight.data.loader import Batch


class Pipeline:
    """One pipeline step per call: every micro-batch's loss is sum(CE) / num_tokens (the trainer's
    per-step normalizer), so the contributions of all micro-batches and accumulation steps add up.
    model_kwargs (positions, document_ids) are split into micro-batches like the inputs and reach
    every stage: the schedule passes keyword arguments to each stage's forward, while positional
    inputs only enter the first stage."""

    def __init__(self, schedule):
        self.schedule = schedule

    def step(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        num_tokens: float | torch.Tensor,
        model_kwargs: dict | None = None,
    ) -> torch.Tensor | None:
        return pipeline_step(self.schedule, inputs, labels, num_tokens=num_tokens, model_kwargs=model_kwargs)

    def eval(self, inputs: torch.Tensor, labels: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor | None:
        """Forward only: the sum of the token losses of the batch on the last stage's rank, else None."""
        return pipeline_step(
            self.schedule, inputs, labels, num_tokens=1.0, model_kwargs=model_kwargs, forward_only=True
        )


@dataclass
class ParallelRun:
    """How this rank takes part in the run (held as `Trainer.parallel`): its model parts and coordinates,
    and the one forward+loss(+backward) of a micro-batch, `forward_loss`."""

    model_parts: list[nn.Module]
    dp_rank: int = 0
    dp_world: int = 1
    cp_rank: int = 0
    cp_world: int = 1  # context parallel: each rank holds a zig-zag slice of every sequence of its batch
    pipeline: Pipeline | None = None
    loss_fn: Callable = cross_entropy_loss
    microbatches_per_step: int = 1  # pipeline micro-batches per forward/backward call
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None  # the ranks that read different data
    moe_count_group: dist.ProcessGroup | None = None  # every rank that routes different tokens through the same layers
    replica_mesh: DeviceMesh | None = None  # ranks holding copies of a weight its own mesh lacks (Muon's replicas)
    holds_loss: bool = True  # this rank's loss counts once in the reported mean (last stage, tp rank 0; any cp)
    # The loss comes from the hidden states in chunks (no [B, S, V] fp32 logits), under pipeline parallel
    # in the schedule's loss_fn; not with a vocab-sharded head (tp > 1: the vocab-parallel loss on logits).
    loss_from_hidden: bool = True
    description: str = "single process"

    def forward_loss(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        packing: dict[str, torch.Tensor],
        num_tokens: torch.Tensor | float | None = None,
    ) -> torch.Tensor | None:
        """One micro-batch through this rank's model parts -> its loss (None on a pipeline rank without
        the last stage), for every configuration: the pipeline schedule, the chunked loss from hidden states,
        or the vocab-parallel `loss_fn` on sharded logits. Training (`num_tokens` given): sum(CE) /
        num_tokens, backward included. Validation (None): the sum of the token losses, no backward."""
        train = num_tokens is not None
        if self.pipeline is not None:
            if train:
                return self.pipeline.step(inputs, labels, num_tokens, packing)
            return self.pipeline.eval(inputs, labels, packing)
        model = self.model_parts[0]
        reduce = {"num_tokens": num_tokens} if train else {"reduction": "sum"}
        if self.loss_from_hidden:
            hidden = model(inputs, return_hidden=True, **packing)
            loss = reduce_token_losses(cross_entropy_from_hidden(hidden, model.lm_head, labels), labels, **reduce)
        else:
            loss = self.loss_fn(model(inputs, **packing), labels, **reduce)
        if train:
            loss.backward()
        return loss

    @property
    def gradient_ranks(self) -> int:
        """The ranks data parallel averages gradients over (they hold different tokens): dp x cp."""
        return self.dp_world * self.cp_world

    def batch_inputs(self, batch: Batch, device: torch.device, document_mask: bool):
        """What the model parts take of a batch on this rank -> (inputs, labels, packing): on the device,
        packing = {positions, document_ids} when document_mask (RoPE positions restart and attention stays
        within each document), else {}; then this rank's slice of the sequences (shard_sequence). The
        copies do not wait for the device, and the ids stay on the host: the model finds the documents
        there (`DocumentMask`), so the host queues micro-batches without a sync."""
        inputs, labels = to_device(batch.inputs, device), to_device(batch.labels, device)
        packing = {}
        if document_mask:
            packing = {"positions": to_device(batch.position_ids, device), "document_ids": batch.document_ids}
        return self.shard_sequence(inputs, labels, packing)

    def shard_sequence(self, inputs: torch.Tensor, labels: torch.Tensor, packing: dict[str, torch.Tensor]):
        """This rank's slice of a batch's sequences -> (inputs, labels, packing): the batch itself, or under
        context parallel its zig-zag slice of inputs, labels and of packing's positions and document_ids,
        with the global positions made explicit (the model's default would count from 0 in every slice)."""
        if self.cp_world == 1:
            return inputs, labels, packing
        if "positions" not in packing:
            packing = {**packing, "positions": torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)}
        cut = functools.partial(zigzag_slice, cp=self.cp_world, rank=self.cp_rank)
        return cut(inputs), cut(labels), {name: cut(t) for name, t in packing.items()}

    def reduce_loss(self, local_loss: torch.Tensor, stop: bool = False) -> torch.Tensor:
        """[the step's mean loss as every rank agrees on it, the number of ranks that asked to `stop`]:
        a device vector, so the step's one host read carries both (no extra sync)."""
        flag = torch.tensor(float(stop), device=local_loss.device)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return torch.stack([local_loss.float(), flag])
        held = torch.stack(
            [local_loss.float() * self.holds_loss, torch.tensor(float(self.holds_loss), device=local_loss.device), flag]
        )
        dist.all_reduce(held)
        return torch.stack([torch.where(held[1] > 0, held[0] / held[1], math.nan), held[2]])


def is_single_process(cfg: JobConfig, world_size: int) -> bool:
    p = cfg.parallelism
    return world_size == 1 and p.tp == p.ep == p.pp == p.cp == p.dp_replicate == 1 and p.dp_shard in (-1, 1)


def is_mixed_precision(cfg: JobConfig) -> bool:
    return is_mixed(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce)


def fsdp_reshard_after_forward(cfg: JobConfig) -> bool:
    """torchtitan's rule unless the config forces it: reshard after forward except under pipeline
    parallel, where a stage's backward needs the weights again soon after its forward."""
    return {"always": True, "never": False}.get(cfg.parallelism.fsdp_reshard_after_forward, cfg.parallelism.pp == 1)


def plan_parallelism(cfg: JobConfig, args: ModelArgs, world_size: int) -> tuple[ParallelDims, list[int] | None]:
    """The degrees and the pipeline layout of a job on `world_size` ranks, validated against the model
    before anything is built (raises ConfigError / ParallelConfigError naming what to change)."""
    p = cfg.parallelism
    dims = ParallelDims(
        dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp, ep=p.ep, pp=p.pp, world_size=world_size
    )
    vp = p.pp_virtual_stages
    pp_layout = resolve_layout(p.pp_layout or None, args, p.pp, vp) if p.pp > 1 else None
    dims.validate(args, pp_layout, vp, sequence_parallel=p.sequence_parallel and p.tp > 1, seq_len=cfg.training.seq_len)
    cfg.grad_accum_steps(dims.dp)
    return dims, pp_layout


def build_parallel_run(
    cfg: JobConfig, args: ModelArgs, world_size: int, device: torch.device, init_full_model: Callable[[], Moonlight]
) -> ParallelRun:
    """Validate the degrees, build the meshes, split pipeline stages and apply the parallel plans.
    `init_full_model()` gives the whole model with its initial weights (on meta when too large to
    initialize whole: then every rank initializes its own shards)."""
    p, t = cfg.parallelism, cfg.training
    if is_single_process(cfg, world_size):
        if not is_mixed_precision(cfg):
            model = init_full_model()
            _materialize(model, device, t.seed)
            if t.compile:
                apply_compile(model, t.compile_backend)
            apply_activation_checkpointing(model, cfg.activation_checkpoint.mode)
            return ParallelRun(model_parts=[model])
        # Mixed precision on one process: FSDP2 over a 1-rank mesh (as torchtitan) applies the same
        # policy as with many ranks (fp32 stored params, low-precision compute), same parameter names.
        init_single_process_group(device.type)
    dims, pp_layout = plan_parallelism(cfg, args, world_size)
    sequence_parallel = p.sequence_parallel and p.tp > 1
    # A dry run on the meta device (moonlight.plan, over a fake process group) meshes like a CPU job.
    mesh = build_mesh(dims, "cpu" if device.type == "meta" else device.type)
    reshard_after_forward = fsdp_reshard_after_forward(cfg)
    full = init_full_model()

    def prepare(module: nn.Module, stage: int = 0) -> nn.Module:
        on_meta = next(module.parameters()).is_meta
        if not on_meta:
            module.to(device)
        if t.compile:  # before the parallel plans wrap the blocks' forwards in checkpointing
            apply_compile(module, t.compile_backend)
        parallelize_model(
            module,
            dims,
            mesh,
            sequence_parallel=sequence_parallel,
            ac_mode=cfg.activation_checkpoint.mode,
            param_dtype=t.mixed_precision_param,
            reduce_dtype=t.mixed_precision_reduce,
            reshard_after_forward=reshard_after_forward,
        )
        if on_meta:  # too large to initialize whole: each rank initializes its shards
            module.to_empty(device=device)
            torch.manual_seed(t.seed + stage)
            module.init_weights()
        return module

    tp_rank = mesh.tp_rank
    common = dict(
        dp_rank=mesh.dp_rank,
        dp_world=mesh.dp_size,
        cp_rank=mesh.cp_rank,
        cp_world=dims.cp,
        dp_group=mesh["dp"].get_group(),
        moe_count_group=mesh["routing"].get_group(),
        replica_mesh=mesh["replicas"],
        description=dims.describe() + (" + sequence parallel" if sequence_parallel else ""),
    )
    from_hidden = p.tp == 1  # a whole head
    if p.pp == 1:
        return ParallelRun(model_parts=[prepare(full)], holds_loss=tp_rank == 0, loss_from_hidden=from_hidden, **common)

    # Each local stage starts from its own copy of the full model (identical initial weights in every configuration).
    build_fn = (lambda _: copy.deepcopy(full)) if not next(full.parameters()).is_meta else None
    stages, parts = build_pipeline_stages(
        args,
        pp_layout,
        mesh["pp"],
        device,
        schedule=p.pp_schedule,
        build_fn=build_fn,
        parallelize_fn=prepare,
        return_hidden=from_hidden,
    )
    n_micro = p.pp_microbatches or t.local_batch_size
    loss_fn = hidden_states_loss(parts) if from_hidden else cross_entropy_loss
    schedule = build_schedule(
        stages, p.pp_schedule, n_micro, loss_fn, scale_grads=False, local_batch_size=t.local_batch_size
    )
    holds_last = any(s.is_last for s in stages)
    common["description"] += f", pipeline {p.pp_schedule} layout {pp_layout} x {n_micro} micro-batches"
    return ParallelRun(
        model_parts=parts,
        pipeline=Pipeline(schedule),
        pp_group=mesh["pp"].get_group(),
        holds_loss=holds_last and tp_rank == 0,
        microbatches_per_step=n_micro,
        loss_from_hidden=from_hidden,
        **common,
    )


def _materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Move a model to the device; one still on meta is allocated there and initialized from `seed`."""
    if next(model.parameters()).is_meta:
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()
    else:
        model.to(device)
