"""Pipeline parallel (PP) with torch.distributed.pipelining; layouts are in pipeline_layout.py.

    stages, parts = build_pipeline_stages(args, layout, pp_mesh, device, return_hidden=True, parallelize_fn=...)
    schedule = build_schedule(stages, name, n_microbatches, hidden_states_loss(parts), local_batch_size=B)
    loss = pipeline_step(schedule, tokens, labels)   # on the last stage's rank, None elsewhere

With a whole head the last stage returns its final hidden states and `hidden_states_loss` applies the
head chunk by chunk (no [B, S, V] fp32 logits); a vocab-sharded head returns logits for
`cross_entropy_loss`. Each microbatch contributes sum(CE) / num_tokens with scale_grads=False, so the
gradients equal a single process's. The MoE aux loss rides inside each MoE layer. Loss scaling and
shape inference: docs/parallelism.md.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    FORWARD,
    RECV_F,
    RESHARD,
    SEND_F,
    UNSHARD,
    PipelineScheduleSingle,
    get_schedule_class,
)

from moonlight.config import ModelArgs
from moonlight.errors import ConfigError
from moonlight.model import Moonlight
from moonlight.model.loss import cross_entropy_from_hidden
from moonlight.parallel.pipeline_layout import (
    SCHEDULES,
    schedule_problems,
    stage_ids_for_rank,
    stage_style,
    validate_layout,
)
from moonlight.parallel.tensor import cross_entropy_loss, reduce_token_losses  # plain or vocab-sharded logits

__all__ = ["build_pipeline_stages", "build_schedule", "cross_entropy_loss", "hidden_states_loss", "pipeline_step"]


def _meta_model(args: ModelArgs) -> nn.Module:
    with torch.device("meta"):
        return Moonlight(args)


def build_pipeline_stages(
    args: ModelArgs,
    layout: Sequence[int],
    pp_mesh: DeviceMesh,
    device: torch.device | str,
    *,
    schedule: str = "1F1B",
    build_fn: Callable[[ModelArgs], nn.Module] | None = None,
    parallelize_fn: Callable[[nn.Module, int], nn.Module | None] | None = None,
    return_hidden: bool = False,
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """Build this rank's pipeline stages; returns (stages, model_parts), one per local virtual stage.

    For each stage held by this rank (see `stage_ids_for_rank`): `build_fn(args)` builds a full
    Moonlight (default: on the meta device, so nothing is allocated), the decoder layers outside the
    stage are deleted (the ModuleDict keeps global keys, so parameter names match the full model and
    checkpoints), `embed` is set to None except on stage 0 and `norm`/`lm_head` to None except on the
    last stage. `parallelize_fn(module, stage_index)` then runs (apply EP/TP/FSDP/AC, `to_empty`,
    `init_weights` or checkpoint load; it may return a replacement module) before the module is
    wrapped as a PipelineStage over `pp_mesh`'s process group. vp = len(layout) // pp_mesh.size().
    return_hidden: the last stage runs as ``model(..., return_hidden=True)``, its output the final
    hidden states for `hidden_states_loss` (a whole head only: a vocab-sharded one needs its logits).
    """
    pp = pp_mesh.size()
    if len(layout) % pp:
        raise ConfigError(f"pp_layout has {len(layout)} stages, not a multiple of pp={pp}")
    vp = len(layout) // pp
    layout = validate_layout(layout, args.num_hidden_layers, pp, vp)
    n_stages = len(layout)
    pp_rank = pp_mesh.get_local_rank()
    group = pp_mesh.get_group()
    build_fn = build_fn or _meta_model
    starts = [sum(layout[:s]) for s in range(n_stages)]
    stages, parts = [], []
    for s in stage_ids_for_rank(pp_rank, pp, vp, stage_style(schedule)):
        model = build_fn(args)
        keep = {str(i) for i in range(starts[s], starts[s] + layout[s])}
        for key in [k for k in model.layers.keys() if k not in keep]:
            del model.layers[key]
        if s != 0:
            model.embed = None
        if s != n_stages - 1:
            model.norm = None
            model.lm_head = None
        if parallelize_fn is not None:
            model = parallelize_fn(model, s) or model
        if return_hidden and s == n_stages - 1:
            # a hook, not a step keyword: the schedule splits every keyword into microbatches as a tensor
            model.register_forward_pre_hook(_ask_for_hidden, with_kwargs=True)
        stages.append(PipelineStage(model, s, n_stages, torch.device(device), group=group))
        parts.append(model)
    return stages, parts


def _ask_for_hidden(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "return_hidden": True}


def hidden_states_loss(parts: Sequence[nn.Module]) -> Callable[..., torch.Tensor]:
    """The schedule's loss_fn for stages built with return_hidden=True: `cross_entropy_from_hidden` of
    the last stage's hidden states through that stage's lm_head (no [B, S, V] fp32 logits), reduced
    as `cross_entropy_loss` reduces its logits' loss (same keywords). Every rank's schedule needs a
    loss_fn to run backward; only the rank holding the last stage (among `parts`) calls it."""
    last = [part for part in parts if part.lm_head is not None]

    def loss_fn(
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        num_tokens: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        (part,) = last
        total = cross_entropy_from_hidden(hidden, part.lm_head, labels, ignore_index)
        return reduce_token_losses(total, labels, ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens)

    return loss_fn


# ------------------------------------------------------------------ schedule and step


def build_schedule(
    stages: list[PipelineStage],
    schedule_name: str,
    n_microbatches: int,
    loss_fn: Callable[..., torch.Tensor] | None = cross_entropy_loss,
    *,
    scale_grads: bool = True,
    local_batch_size: int | None = None,
):
    """A torch.distributed.pipelining schedule over this rank's stages, with the microbatch count
    checked up front (errors say what to change). `local_batch_size`: the per-step batch (sequences)
    this pipeline receives; it must split into n_microbatches equal microbatches.
    See the module docstring for scale_grads / loss scaling."""
    try:
        cls = get_schedule_class(schedule_name)
    except ValueError as e:
        raise ConfigError(f"unknown pipeline schedule {schedule_name!r}; choose one of {list(SCHEDULES)}") from e
    if not stages:
        raise ValueError("no pipeline stages on this rank")
    pp, n_stages = stages[0].group_size, stages[0].num_stages
    single = issubclass(cls, PipelineScheduleSingle)
    name = cls.__name__.removeprefix("Schedule")
    problems = schedule_problems(name, len(stages))
    if problems:
        raise ConfigError(problems[0])
    if n_microbatches < 1:
        raise ConfigError(f"n_microbatches must be >= 1, got {n_microbatches}")
    if local_batch_size is not None and local_batch_size % n_microbatches:
        raise ConfigError(
            f"the local batch of {local_batch_size} sequences does not split into {n_microbatches} "
            "equal microbatches: choose n_microbatches dividing it"
        )
    need = n_stages if name == "DualPipeV" else (pp if name != "GPipe" else 1)
    if n_microbatches < need:
        raise ConfigError(
            f"schedule {name} needs at least {need} microbatches "
            f"({'stages' if name == 'DualPipeV' else 'pp ranks'}), got {n_microbatches}"
        )
    if not single and name != "ZBVZeroBubble":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(
                f"schedule {name} with pp={pp} needs n_microbatches to be a multiple of "
                f"{rounds} (n_microbatches // pp), got {n_microbatches}: use a multiple of pp"
            )
    if single:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)


def _local_stages(schedule) -> list:
    return list(getattr(schedule, "_stages", None) or [schedule._stage])


_initialized_schedules: weakref.WeakSet = weakref.WeakSet()


def _runs_metadata_inference(schedule) -> bool:
    """Whether this step() will first run torch's stage metadata inference (first training step, and
    the first after an eval() of the schedule)."""
    for attr in ("_stage_backward_initialized", "_stages_backward_initialized"):
        if hasattr(schedule, attr):
            return not getattr(schedule, attr)
    return schedule not in _initialized_schedules


class _RestoreCountersOnce:
    """Forward hook: after the module's next forward, put the MoE load counters back as they were."""

    def __init__(self, module: nn.Module):
        self.counters = [m for m in module.modules() if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)]
        self.saved = [m.tokens_per_expert.clone() for m in self.counters]
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        with torch.no_grad():
            for m, t in zip(self.counters, self.saved):
                m.tokens_per_expert.copy_(t)
        self.handle.remove()


def _discard_inference_forward(stages) -> list[_RestoreCountersOnce]:
    """torch's metadata inference runs one real forward per stage (on placeholder activations for all
    but the first stage) before the microbatches; undo what that forward adds to the MoE load counters
    (`tokens_per_expert`, read by the router-bias update)."""
    return [_RestoreCountersOnce(stage.submod) for stage in stages]


# The actions a forward-only pass runs: forwards, the activations' sends and receives, FSDP's unshard and reshard
_FORWARD_ACTIONS = (FORWARD, RECV_F, SEND_F, UNSHARD, RESHARD)


@contextlib.contextmanager
def _forward_actions_only(schedule):
    """Let a multi-stage schedule run only its forward actions (a single-stage one runs as it is): torch's
    eval() keeps the backward ones, and where a rank holds two adjacent stages (the V-shape schedules)
    handing the input gradient from one to the other fails without a backward. An overlapped
    forward+backward action (DualPipeV) keeps its forward."""
    lowered = getattr(schedule, "pipeline_order_with_comms", None)
    if lowered is None:
        yield
        return
    schedule.pipeline_order_with_comms = {
        rank: [part for a in actions for part in a.sub_actions or (a,) if part.computation_type in _FORWARD_ACTIONS]
        for rank, actions in lowered.items()
    }
    try:
        yield
    finally:
        schedule.pipeline_order_with_comms = lowered


def pipeline_step(
    schedule,
    inputs: torch.Tensor | None,
    labels: torch.Tensor | None,
    is_first: bool | None = None,
    is_last: bool | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    forward_only: bool = False,
) -> torch.Tensor | None:
    """Forward + backward of one local batch through the pipeline (forward_only: the schedule's
    eval() over its forward actions alone, no backward; call it under torch.no_grad).

    inputs (tokens [B, S]) are used on the rank holding the first stage, labels [B, S] on the rank
    holding the last one (pass them everywhere or None where unused). model_kwargs ([B, ...] tensors,
    e.g. positions and document_ids) are split into microbatches and passed to every stage's
    forward, so pass them on every rank. is_first / is_last default to what this rank's stages are.
    Returns the batch loss (detached) on the last-stage rank, else None: the mean of the microbatch
    losses, or with num_tokens their sum (see the module docstring).
    """
    stages = _local_stages(schedule)
    is_first = any(s.is_first for s in stages) if is_first is None else is_first
    is_last = any(s.is_last for s in stages) if is_last is None else is_last
    losses: list[torch.Tensor] | None = [] if is_last else None
    args = (inputs,) if is_first else ()
    kwargs = dict(model_kwargs or {})
    run = schedule.eval if forward_only else schedule.step
    loss_fn = schedule._loss_fn
    if num_tokens is not None and "loss_kwargs" in inspect.signature(run).parameters:
        kwargs["loss_kwargs"] = {"num_tokens": num_tokens}
    elif num_tokens is not None and loss_fn is not None:  # torch 2.11 would hand loss_kwargs to the model
        schedule._loss_fn = functools.partial(loss_fn, num_tokens=num_tokens)
    hooks = _discard_inference_forward(stages) if _runs_metadata_inference(schedule) else []
    try:
        with _forward_actions_only(schedule) if forward_only else contextlib.nullcontext():
            run(*args, target=labels if is_last else None, losses=losses, return_outputs=False, **kwargs)
    finally:
        schedule._loss_fn = loss_fn
        for hook in hooks:
            hook.handle.remove()  # no-op when it already fired
    _initialized_schedules.add(schedule)
    if not is_last:
        return None
    stacked = torch.stack([loss.detach().float() for loss in losses])
    return stacked.sum() if num_tokens is not None else stacked.mean()
