"""Pipeline parallel (PP) with torch.distributed.pipelining.

Layouts
-------
A layout is a list of decoder-layer counts, one per (virtual) stage, in model order: length pp * vp.
Stage 0 also holds the embedding, the last stage the final norm, lm_head and loss. Stage s runs on
pp rank `s % pp` for the loop-style schedules (1F1B, GPipe, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble) and on the V-shape for ZBVZeroBubble / DualPipeV (vp = 2: rank r holds stages r
and 2*pp-1-r, so rank 0 holds the first and the last stage).

    resolve_layout(spec, model_args, pp, vp)   spec: None/"auto" (cost model), a preset name, or a list
    validate_layout(layout, num_layers, pp, vp)
    auto_layout(model_args, pp, vp, seq_len)   balanced by a per-token FLOP cost model
    PRESET_LAYOUTS                             Moonlight (27 layers): PP2, PP4, PP8, PP2xVP2, PP4xVP2

Trainer flow
------------
    layout = resolve_layout(cfg.pp_layout, args, pp, vp)
    stages, parts = build_pipeline_stages(args, layout, pp_mesh, device, schedule=name,
                                          parallelize_fn=lambda m, s: parallelize_and_init(m))
    schedule = build_schedule(stages, name, n_microbatches, cross_entropy_loss, local_batch_size=B)
    each step:  for p in parts: zero grads
                loss = pipeline_step(schedule, tokens, labels)   # loss on the rank holding the last
                                                                 # stage, None elsewhere
                (dp grad reduction happens inside FSDP's post-backward, driven by the schedule)
                optimizer over the parameters of all `parts`

Loss scaling (checked by tests/test_parallel_pp.py): the schedule calls the loss function once per
microbatch and, with scale_grads=True (the default here), divides every .grad of the stage modules by
n_microbatches after the last backward. With `cross_entropy_loss` (mean over a microbatch's tokens)
and equal-sized microbatches the gradients are exactly those of the mean loss over the whole local
batch, as a single process computes it; `pipeline_step` returns the mean of the microbatch losses.
Because the division applies to the whole .grad, zero the grads before each step (no accumulation
across steps in this mode). For an exact token-weighted mean with ignored labels, or accumulation over
several steps, build the schedule with scale_grads=False and pass num_tokens (the token count the
loss is normalised by, e.g. the global count of valid labels) to pipeline_step: each microbatch then
contributes sum(CE) / num_tokens and the returned loss is their sum. The MoE aux loss is attached
inside each MoE layer (an autograd identity), so it needs nothing from the pipeline and is scaled
the same way as the main loss.

Shape inference: on its first training step (and the first after `schedule.eval`) torch runs one
extra forward + input-backward per stage on placeholder activations to learn the shapes. Parameter
grads are unaffected, and `pipeline_step` undoes what that forward adds to the MoE load counters
(`tokens_per_expert`), so after a step they hold exactly the step's real tokens. With expert parallel
these extra forwards run the all-to-alls too, on all ep ranks alike. Call `schedule.step` directly
and the first step's counters include one extra (placeholder) microbatch per stage.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from moonlight.config import ModelArgs
from moonlight.errors import ConfigError
from moonlight.model import Moonlight
from moonlight.parallel.tensor import cross_entropy_loss  # plain or vocab-sharded logits

__all__ = [
    "PRESET_LAYOUTS", "SCHEDULES", "auto_layout", "build_pipeline_stages", "build_schedule", "layout_problems",
    "schedule_problems",
    "cross_entropy_loss", "layout_costs", "pipeline_step", "resolve_layout", "stage_ids_for_rank",
    "stage_style", "validate_layout",
]

# Moonlight-16B-A3B (27 decoder layers). PP2 and PP4 are Megatron-Bridge's recipe splits; VP2 with PP2
# reuses the PP4 split. Megatron-Bridge's published PP8 table sums to 31 and is rejected by
# validate_layout; the PP8 / PP4xVP2 entries here give the last stage (lm_head + loss, about four
# layers' worth of FLOPs per token) the fewest layers and sum to 27.
PRESET_LAYOUTS: dict[str, list[int]] = {
    "PP2": [14, 13],
    "PP4": [7, 7, 7, 6],
    "PP8": [4, 4, 4, 4, 3, 3, 3, 2],
    "PP2xVP2": [7, 7, 7, 6],
    "PP4xVP2": [4, 4, 4, 4, 3, 3, 3, 2],
}

# Schedules by how many stages each runs per pipeline rank (pp_virtual_stages).
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")  # exactly 2 stages per rank, V-shaped
SCHEDULES = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES + V_SCHEDULES


def schedule_problems(schedule: str, vp: int) -> list[str]:
    """What is wrong with running `schedule` with `vp` stages per pipeline rank (empty: nothing)."""
    if schedule not in SCHEDULES:
        return [f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}"]
    if schedule in SINGLE_STAGE_SCHEDULES and vp != 1:
        return [f"pp_schedule={schedule!r} runs one stage per rank, but pp_virtual_stages={vp}; use "
                "Interleaved1F1B or InterleavedZeroBubble for virtual stages"]
    if schedule in V_SCHEDULES and vp != 2:
        return [f"pp_schedule={schedule!r} needs pp_virtual_stages=2 (V-shape), got {vp}"]
    return []


# ------------------------------------------------------------------ layouts


def _preset_shape(name: str) -> tuple[int, int]:
    pp, _, vp = name.upper().removeprefix("PP").partition("XVP")
    return int(pp), int(vp or 1)


def layout_problems(layout: Sequence[int] | None, num_layers: int | None, pp: int, vp: int = 1) -> list[str]:
    """What is wrong with a pipeline layout (empty: nothing). `layout` None means the cost model will
    choose one; `num_layers` None skips the checks that need the model."""
    if pp < 1 or vp < 1:
        return [f"pp={pp} and pp_virtual_stages={vp} must be >= 1"]
    stages = f"pp={pp} x pp_virtual_stages={vp} = {pp * vp} stages" if vp > 1 else f"pp={pp} stages"
    if layout is None:
        if num_layers is not None and pp * vp > num_layers:
            return [f"{stages} exceed the {num_layers} decoder layers: every stage needs at least one layer; "
                    "lower pp or pp_virtual_stages"]
        return []
    layout = list(layout)
    shown = f"pp_layout {layout}"
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in layout):
        return [f"{shown} must be a list of integers (decoder layers per stage)"]
    problems = []
    if len(layout) != pp * vp:
        problems.append(f"{shown} has {len(layout)} entries but {stages} need {pp * vp}: give one layer "
                        f"count per {'virtual ' if vp > 1 else ''}stage, or change pp/pp_virtual_stages")
    empty = [i for i, n in enumerate(layout) if n < 1]
    if empty:
        problems.append(f"{shown} has an empty stage at index {empty[0]}: every stage needs at least one "
                        "decoder layer; move a layer there from a neighbour, or use fewer stages")
    total = sum(layout)
    if num_layers is not None and total != num_layers:
        fix = (f"remove {total - num_layers} layer(s)" if total > num_layers
               else f"add {num_layers - total} layer(s)")
        problems.append(f"{shown} sums to {total} but the model has {num_layers} layers: {fix} across "
                        "the stages, or leave pp_layout empty to let the cost model choose")
    return problems


def validate_layout(layout: Sequence[int], num_layers: int, pp: int, vp: int = 1) -> list[int]:
    """Check a layout and return it as a list; raise ConfigError naming the problems and the fix."""
    problems = layout_problems(layout, num_layers, pp, vp)
    if problems:
        raise ConfigError("; ".join(problems))
    return list(layout)


def _embed_flops(args: ModelArgs) -> float:
    return float(args.hidden_size)  # a row lookup: memory, not FLOPs; counted as one pass over the row


def _head_flops(args: ModelArgs) -> float:
    # final norm + lm_head matmul + log-softmax / cross-entropy over the vocabulary (~5 ops per logit)
    return 2.0 * args.hidden_size * args.vocab_size + 5.0 * args.vocab_size + 4.0 * args.hidden_size


def layout_costs(args: ModelArgs, layout: Sequence[int], seq_len: int = 4096) -> list[float]:
    """Forward FLOPs per token of each stage of `layout` (the cost model of `auto_layout`)."""
    costs, start = [], 0
    for s, n in enumerate(layout):
        c = sum(args.layer_flops(i, seq_len) for i in range(start, start + n))
        c += _embed_flops(args) if s == 0 else 0.0
        c += _head_flops(args) if s == len(layout) - 1 else 0.0
        costs.append(c)
        start += n
    return costs


def auto_layout(args: ModelArgs, pp: int, vp: int = 1, seq_len: int = 4096) -> list[int]:
    """Contiguous, non-empty split of the decoder layers into pp * vp stages minimising the most
    expensive stage (ties: the most even split), under the per-token FLOP model of `layout_costs`:
    the embedding is cheap, the lm_head + loss costs 2 * hidden * vocab per token (about four MoE
    layers for Moonlight), so the last stage gets fewer layers."""
    n_stages, n_layers = pp * vp, args.num_hidden_layers
    problems = layout_problems(None, n_layers, pp, vp)
    if problems:
        raise ConfigError(problems[0])
    layer = [args.layer_flops(i, seq_len) for i in range(n_layers)]
    prefix = [0.0]
    for c in layer:
        prefix.append(prefix[-1] + c)

    def cost(s, a, b):  # stage s holding layers [a, b)
        c = prefix[b] - prefix[a]
        return c + (_embed_flops(args) if s == 0 else 0.0) + (_head_flops(args) if s == n_stages - 1 else 0.0)

    def solve(objective, bound=math.inf):
        # best[s][b]: best value for stages 0..s-1 covering layers [0, b); objective combines values
        inf = (math.inf, math.inf)
        best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
        arg = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
        best[0][0] = (0.0, 0.0)
        for s in range(1, n_stages + 1):
            for b in range(s, n_layers - (n_stages - s) + 1):
                for a in range(s - 1, b):
                    if best[s - 1][a] == inf:
                        continue
                    c = cost(s - 1, a, b)
                    if c > bound * (1 + 1e-12):
                        continue
                    val = objective(best[s - 1][a], c)
                    if val <= best[s][b]:  # ties: the latest split point a
                        best[s][b], arg[s][b] = val, a
        layout, b = [], n_layers
        for s in range(n_stages, 0, -1):
            a = arg[s][b]
            layout.append(b - a)
            b = a
        return layout[::-1], best[n_stages][n_layers]

    _, (max_cost, _) = solve(lambda prev, c: (max(prev[0], c), 0.0))
    # Among the min-max splits, the most even one; costs in units of 1% of a mean layer, so that the
    # tiny dense/MoE difference does not pick between otherwise equal splits. Remaining ties put the
    # fewer layers on the later stage.
    unit = prefix[-1] / n_layers / 100
    layout, _ = solve(lambda prev, c: (prev[0] + round(c / unit) ** 2, 0.0), bound=max_cost)
    return layout


def resolve_layout(spec: str | Sequence[int] | None, args: ModelArgs, pp: int, vp: int = 1,
                   seq_len: int = 4096) -> list[int]:
    """A layout from a job config value: None or "auto" (cost model), a preset name such as "PP4xVP2"
    (for a 27-layer model), or an explicit list. Always validated against the model and pp/vp."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "auto"):
        return validate_layout(auto_layout(args, pp, vp, seq_len), args.num_hidden_layers, pp, vp)
    if isinstance(spec, str):
        key = {k.upper(): k for k in PRESET_LAYOUTS}.get(spec.upper())
        if key is None:
            raise ConfigError(f"unknown pp_layout preset {spec!r}; choose one of {sorted(PRESET_LAYOUTS)}, "
                              "'auto', or a list of layer counts")
        if _preset_shape(key) != (pp, vp):
            raise ConfigError(f"pp_layout preset {key!r} is for pp={_preset_shape(key)[0]}, pp_virtual_stages="
                              f"{_preset_shape(key)[1]}, but the job has pp={pp}, pp_virtual_stages={vp}")
        return validate_layout(PRESET_LAYOUTS[key], args.num_hidden_layers, pp, vp)
    return validate_layout(spec, args.num_hidden_layers, pp, vp)


# ------------------------------------------------------------------ stages


def stage_style(schedule_name: str) -> str:
    """'v' for the V-shape schedules (ZBVZeroBubble, DualPipeV), else 'loop'."""
    return "v" if schedule_name.lower() in {name.lower() for name in V_SCHEDULES} else "loop"


def stage_ids_for_rank(pp_rank: int, pp: int, vp: int, style: str = "loop") -> list[int]:
    """The (virtual) stage indices held by `pp_rank`, in increasing order."""
    if style == "v":
        if vp != 2:
            raise ConfigError(f"V-shape schedules (ZBVZeroBubble, DualPipeV) need pp_virtual_stages=2, got {vp}")
        return sorted({pp_rank, 2 * pp - 1 - pp_rank})
    if style != "loop":
        raise ValueError(f"style must be 'loop' or 'v', got {style!r}")
    return [pp_rank + i * pp for i in range(vp)]


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
) -> tuple[list[PipelineStage], list[nn.Module]]:
    """Build this rank's pipeline stages; returns (stages, model_parts), one per local virtual stage.

    For each stage held by this rank (see `stage_ids_for_rank`): `build_fn(args)` builds a full
    Moonlight (default: on the meta device, so nothing is allocated), the decoder layers outside the
    stage are deleted (the ModuleDict keeps global keys, so parameter names match the full model and
    checkpoints), `embed` is set to None except on stage 0 and `norm`/`lm_head` to None except on the
    last stage. `parallelize_fn(module, stage_index)` then runs (apply EP/TP/FSDP/AC, `to_empty`,
    `init_weights` or checkpoint load; it may return a replacement module) before the module is
    wrapped as a PipelineStage over `pp_mesh`'s process group. vp = len(layout) // pp_mesh.size().
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
        stages.append(PipelineStage(model, s, n_stages, torch.device(device), group=group))
        parts.append(model)
    return stages, parts


# ------------------------------------------------------------------ schedule and step


def build_schedule(stages: list[PipelineStage], schedule_name: str, n_microbatches: int,
                   loss_fn: Callable[..., torch.Tensor] | None = cross_entropy_loss, *,
                   scale_grads: bool = True, local_batch_size: int | None = None):
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
        raise ConfigError(f"the local batch of {local_batch_size} sequences does not split into {n_microbatches} "
                          "equal microbatches: choose n_microbatches dividing it")
    need = n_stages if name == "DualPipeV" else (pp if name != "GPipe" else 1)
    if n_microbatches < need:
        raise ConfigError(f"schedule {name} needs at least {need} microbatches "
                          f"({'stages' if name == 'DualPipeV' else 'pp ranks'}), got {n_microbatches}")
    if not single and name != "ZBVZeroBubble":
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(f"schedule {name} with pp={pp} needs n_microbatches to be a multiple of "
                              f"{rounds} (n_microbatches // pp), got {n_microbatches}: use a multiple of pp")
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
        self.counters = [m for m in module.modules()
                         if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)]
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


def pipeline_step(schedule, inputs: torch.Tensor | None, labels: torch.Tensor | None,
                  is_first: bool | None = None, is_last: bool | None = None,
                  num_tokens: int | float | torch.Tensor | None = None, model_kwargs: dict | None = None,
                  forward_only: bool = False) -> torch.Tensor | None:
    """Forward + backward of one local batch through the pipeline (forward_only: the schedule's
    eval(), no backward; call it under torch.no_grad).

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
    if num_tokens is not None:
        kwargs["loss_kwargs"] = {"num_tokens": num_tokens}
    hooks = _discard_inference_forward(stages) if _runs_metadata_inference(schedule) else []
    try:
        run = schedule.eval if forward_only else schedule.step
        run(*args, target=labels if is_last else None, losses=losses, return_outputs=False, **kwargs)
    finally:
        for hook in hooks:
            hook.handle.remove()  # no-op when it already fired
    _initialized_schedules.add(schedule)
    if not is_last:
        return None
    stacked = torch.stack([loss.detach().float() for loss in losses])
    return stacked.sum() if num_tokens is not None else stacked.mean()
