"""Pipeline layouts: how many decoder layers each (virtual) stage holds, and the schedules by name.

A layout is a list of decoder-layer counts, one per (virtual) stage, in model order: length pp * vp.
Stage 0 also holds the embedding, the last stage the final norm, lm_head and loss. Stage s runs on
pp rank `s % pp` for the loop-style schedules (1F1B, GPipe, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble) and on the V-shape for ZBVZeroBubble / DualPipeV (vp = 2: rank r holds stages r
and 2*pp-1-r, so rank 0 holds the first and the last stage).

    resolve_layout(spec, model_args, pp, vp)   spec: None/"auto" (cost model), a preset name, or a list
    validate_layout(layout, num_layers, pp, vp)
    auto_layout(model_args, pp, vp, seq_len)   balanced by a per-token FLOP cost model
    PRESET_LAYOUTS                             Moonlight (27 layers): PP2, PP4, PP8, PP2xVP2, PP4xVP2
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch.autograd.graph import GradientEdge

from moonlight.config import ModelArgs
from moonlight.errors import ConfigError

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
# Schedules whose weight-only backward starts autograd at GradientEdges of the graph's nodes.
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


@functools.cache
def splits_backward_through_python_nodes() -> bool:
    """Whether autograd.grad takes a GradientEdge of a Python autograd.Function node, as torch's weight-only
    backward passes it the nodes where weights meet activations (the model's norms, grouped GEMMs and loss
    are such nodes). torch 2.11 refuses (no `_input_metadata` on those nodes)."""
    x = torch.zeros(1, requires_grad=True)
    try:
        torch.autograd.grad([GradientEdge(_Identity.apply(x).grad_fn, 0)], [x], grad_outputs=[torch.ones(1)])
    except RuntimeError:
        return False
    return True


def schedule_problems(schedule: str, vp: int) -> list[str]:
    """What is wrong with running `schedule` with `vp` stages per pipeline rank (empty: nothing)."""
    if schedule not in SCHEDULES:
        return [f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}"]
    if schedule in SINGLE_STAGE_SCHEDULES and vp != 1:
        return [
            f"pp_schedule={schedule!r} runs one stage per rank, but pp_virtual_stages={vp}; use "
            "Interleaved1F1B or InterleavedZeroBubble for virtual stages"
        ]
    if schedule in V_SCHEDULES and vp != 2:
        return [f"pp_schedule={schedule!r} needs pp_virtual_stages=2 (V-shape), got {vp}"]
    if schedule in SPLIT_BACKWARD_SCHEDULES and not splits_backward_through_python_nodes():
        working = [name for name in SCHEDULES if name not in SPLIT_BACKWARD_SCHEDULES]
        return [
            f"pp_schedule={schedule!r} does not run on torch {torch.__version__}: its weight-only backward "
            f"cannot pass through this model's custom autograd nodes; use one of {working} (Interleaved1F1B "
            "for virtual stages) or a newer torch"
        ]
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
            return [
                f"{stages} exceed the {num_layers} decoder layers: every stage needs at least one layer; "
                "lower pp or pp_virtual_stages"
            ]
        return []
    layout = list(layout)
    shown = f"pp_layout {layout}"
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in layout):
        return [f"{shown} must be a list of integers (decoder layers per stage)"]
    problems = []
    if len(layout) != pp * vp:
        problems.append(
            f"{shown} has {len(layout)} entries but {stages} need {pp * vp}: give one layer "
            f"count per {'virtual ' if vp > 1 else ''}stage, or change pp/pp_virtual_stages"
        )
    empty = [i for i, n in enumerate(layout) if n < 1]
    if empty:
        problems.append(
            f"{shown} has an empty stage at index {empty[0]}: every stage needs at least one "
            "decoder layer; move a layer there from a neighbour, or use fewer stages"
        )
    total = sum(layout)
    if num_layers is not None and total != num_layers:
        fix = f"remove {total - num_layers} layer(s)" if total > num_layers else f"add {num_layers - total} layer(s)"
        problems.append(
            f"{shown} sums to {total} but the model has {num_layers} layers: {fix} across "
            "the stages, or leave pp_layout empty to let the cost model choose"
        )
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
    """Contiguous, non-empty split of the decoder layers into pp * vp stages minimizing the most
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


def resolve_layout(
    spec: str | Sequence[int] | None, args: ModelArgs, pp: int, vp: int = 1, seq_len: int = 4096
) -> list[int]:
    """A layout from a job config value: None or "auto" (cost model), a preset name such as "PP4xVP2"
    (for a 27-layer model), or an explicit list. Always validated against the model and pp/vp."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "auto"):
        return validate_layout(auto_layout(args, pp, vp, seq_len), args.num_hidden_layers, pp, vp)
    if isinstance(spec, str):
        key = {k.upper(): k for k in PRESET_LAYOUTS}.get(spec.upper())
        if key is None:
            raise ConfigError(
                f"unknown pp_layout preset {spec!r}; choose one of {sorted(PRESET_LAYOUTS)}, "
                "'auto', or a list of layer counts"
            )
        if _preset_shape(key) != (pp, vp):
            raise ConfigError(
                f"pp_layout preset {key!r} is for pp={_preset_shape(key)[0]}, pp_virtual_stages="
                f"{_preset_shape(key)[1]}, but the job has pp={pp}, pp_virtual_stages={vp}"
            )
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
