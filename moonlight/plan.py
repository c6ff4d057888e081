"""Will a job fit? `python -m moonlight.plan --config configs/X.toml --world-size N [--gpu-memory-gib 80]`

For a job config on N ranks it reports, for the most loaded rank of every pipeline stage:
- parameter, gradient and optimizer-state bytes by dtype. These are not re-derived from sharding rules:
  the planner runs the trainer's own `build_parallel_run` (which validates the degrees with `plan_parallelism`
  first) for that rank on the meta device over a fake process group, so FSDP/EP/TP/PP sharding is
  exactly what the trainer builds, then builds the trainer's optimizers on those parameters
  (`cfg.optimizer.build`: Muon vs AdamW, precision_aware master weights) and counts their state;
- an activation estimate per micro-batch (`activation_bytes` and the loss's `loss_bytes`, formulas in
  their docstrings);
- FLOPs per token (`ModelArgs.flops_per_token`).
It exits with code 2 and one line naming the fix when the parallelism is invalid or a rank does not fit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import multiprocessing as mp
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import FakeProcessGroup

from moonlight.config import ModelArgs
from moonlight.distributed import local_tensor
from moonlight.dtypes import to_dtype
from moonlight.errors import ArgumentParser, ConfigError, exit_on_user_error
from moonlight.model import Moonlight
from moonlight.model.converters import convert_model
from moonlight.model.loss import linear_cross_entropy
from moonlight.train.config import JobConfig, parse_args
from moonlight.train.parallel_run import build_parallel_run, is_single_process, plan_parallelism
from moonlight.train.optim import AdamW, Muon
from moonlight.train.build import build_converters, build_model_args, check_seq_len

GIB = 1024**3
CHUNK_BYTES = inspect.signature(linear_cross_entropy).parameters["chunk_bytes"].default  # the trainer's loss's


@dataclass
class RankPlan:
    rank: int
    description: str
    params: Counter = field(default_factory=Counter)  # dtype name -> bytes of this rank's local shards
    grads: Counter = field(default_factory=Counter)
    optimizer: Counter = field(default_factory=Counter)
    activations: int = 0  # bytes for the micro-batches this rank holds at once

    @property
    def total(self) -> int:
        return sum(self.params.values()) + sum(self.grads.values()) + sum(self.optimizer.values()) + self.activations


@dataclass
class Plan:
    world_size: int
    parallelism: str  # the degrees, as the trainer's header names them
    flops_per_token: float
    ranks: list[RankPlan]

    @property
    def peak(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total)


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Counter:
    """Bytes of the state `optimizer` creates for parameter `p` on its first step, by dtype (the rules
    of moonlight.train.optim and torch.optim.AdamW; a test checks them against real steps)."""
    local = local_tensor(p)
    master = bool(optimizer.defaults.get("master_weights", False))
    state_dtype = torch.float32 if master else local.dtype
    n = local.numel()
    out = Counter()
    moments = 1 if isinstance(optimizer, Muon) else 2  # Muon: momentum; AdamW: exp_avg, exp_avg_sq
    out[_dtype_name(state_dtype)] += moments * n * state_dtype.itemsize
    if master:
        out["float32"] += n * 4
    if isinstance(optimizer, (AdamW, torch.optim.AdamW)):
        out["float32"] += 4  # the fp32 step counter
    return out


def _count(rank: int, description: str, model_parts, cfg: JobConfig) -> RankPlan:
    plan = RankPlan(rank, description)
    named = [(n, p) for part in model_parts for n, p in part.named_parameters()]
    for _, p in named:
        plan.params[_dtype_name(p.dtype)] += _nbytes(p)
        if p.requires_grad:  # FSDP2 hands back gradients in the parameter's dtype
            plan.grads[_dtype_name(p.dtype)] += _nbytes(p)
    for optimizer in cfg.optimizer.build(named):
        for group in optimizer.param_groups:
            for p in group["params"]:
                plan.optimizer.update(optimizer_state_bytes(optimizer, p))
    return plan


def _meta_model(cfg: JobConfig, args: ModelArgs):
    """What Trainer._init_full_model builds, on the meta device: the model in training.dtype with its
    model converters (LoRA/DoRA adapters)."""

    def build() -> Moonlight:
        with torch.device("meta"):
            model = Moonlight(args)
        return convert_model(model.to(to_dtype(cfg.training.dtype)), build_converters(cfg))

    return build


def activation_bytes(
    args: ModelArgs,
    cfg: JobConfig,
    layer_ids: list[int],
    has_head: bool,
    tokens: int,
    tp: int = 1,
    moe_tp: int = 1,
    keys_per_token: float = 1.0,
) -> int:
    """Tensors autograd saves for backward in one micro-batch of `tokens` tokens.

    Per token, in elements of the compute dtype c (mixed_precision_param, else training.dtype) unless
    marked fp32, with h hidden, H heads (/tp), q = qk_head_dim, v = v_head_dim, r = kv_lora_rank,
    p = qk_rope_head_dim, K = experts per token, I = moe_intermediate_size, S = shared experts x I,
    D = intermediate_size, E = routed experts, V = vocab:
      each RMSNorm       h + 1 fp32 (input, rsqrt)
      attention          h + 7Hq + Hv + (r + p) + 2r + H fp32 (logsumexp)
      dense MLP          h + 3D (SwiGLU keeps gate and up, not silu(gate))
      MoE                h + 3E fp32 + 2K + Kh (the routed rows, kept once) + 3KI + h + 3S
      head               norm + h (the hidden states the loss starts from; the loss: `loss_bytes`)
    activation_checkpoint "selective" keeps only the attention input (h) instead of the attention
    terms; "full" keeps each block's input (h) and, during backward, one block's own terms. The
    estimate is within 25% of what torch's saved-tensor hooks measure (tests/single/test_plan.py); it leaves
    out the temporaries of a single op and the transient FSDP all-gather buffers. ``moe_tp``: the tp
    ranks the MoE terms are split over when each routes only its own sequence shard (EP spanning TP).
    ``keys_per_token``: the keys a rank's attention holds per local token, 1 without context parallel;
    under it rank i of cp up-projects the keys of the first 2cp - i of the 2cp chunks, (2cp - i) / 2 per
    local token, each with its gathered latent and rope key (r + p) and its per-head k and padded v (2Hq).
    """
    c = _compute_itemsize(cfg)
    h, heads = args.hidden_size, args.num_attention_heads // tp
    q, v, r, p = args.qk_head_dim, args.v_head_dim, args.kv_lora_rank, args.qk_rope_head_dim
    k, i, s = args.num_experts_per_tok, args.moe_intermediate_size, args.n_shared_experts * args.moe_intermediate_size
    norm = h * c + 4
    key_side = (2 * heads * q + r + p) * c
    attention = (h + 7 * heads * q + heads * v + r + p + 2 * r) * c + heads * 4 + round((keys_per_token - 1) * key_side)
    mode = cfg.activation_checkpoint.mode

    def block(layer_id: int) -> tuple[int, int]:
        """(bytes kept until backward, bytes of the block's own saved tensors)."""
        if args.is_moe_layer(layer_id):
            ffn = ((h + 2 * k + k * h + 3 * k * i + h + 3 * s) * c + 3 * args.n_routed_experts * 4) // moe_tp
        else:
            ffn = (h + 3 * args.intermediate_size // tp) * c
        own = 2 * norm + attention + ffn
        if mode == "full":
            return h * c, own
        if mode == "selective":
            return 2 * norm + h * c + ffn, own
        return own, own

    kept = [block(layer) for layer in layer_ids]
    per_token = sum(k for k, _ in kept) + (max(own for _, own in kept) if mode == "full" and kept else 0)
    if has_head:
        per_token += norm + h * c
    return per_token * tokens


def _compute_itemsize(cfg: JobConfig) -> int:
    """Bytes of an element of the compute dtype: mixed_precision_param, else training.dtype."""
    p = cfg.training.mixed_precision_param
    return to_dtype(p if p != "float32" else cfg.training.dtype).itemsize


def loss_bytes(
    args: ModelArgs,
    cfg: JobConfig,
    tokens: int,
    tp: int = 1,
    chunked: bool = True,
    head_grad: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[int, int]:
    """(kept, working): the bytes the loss of one micro-batch of `tokens` tokens holds from its forward
    until its backward, and the most it holds on top of those while it runs (its input, the hidden
    states, not counted; tests/single/test_plan.py measures both within 2%). c: the compute dtype's
    bytes, a = max(c, 4) (the logits' fp32, fp64 stays fp64), N tokens, H hidden, V vocab:
      chunked (a whole head, the model's own: linear_cross_entropy in equal chunks of n <= chunk_bytes / 4V
        rows): kept = the hidden states' gradient NHc, and when the head trains its fp32 gradient VHa;
        working = one chunk at a time: its logits in fp32 and (below fp32) in c, nV (a + c), or their
        copy in c nVc and, when the head trains, its gradient product VHc; the head's fp32 gradient is
        made from the first chunk's product (in fp32 it is that product), so the first chunk's logits
        come before it; and when the head trains, the hidden states with ignored tokens zeroed NHc
      logits (a vocab-sharded head, tp > 1, or a converter's head): kept = the fp32 softmax N V/tp a;
        working = the logits N V/tp c and their fp32 copy N V/tp a (a converter's head, whose loss is
        F.cross_entropy's, holds N V (a - c) more in its backward)
    """
    c = _compute_itemsize(cfg)
    a = max(c, 4)
    h, vocab = args.hidden_size, args.vocab_size
    if not chunked:
        return tokens * vocab // tp * a, tokens * vocab // tp * (c + a)
    max_rows = max(1, chunk_bytes // (4 * vocab))
    chunks = -(-tokens // max_rows)
    rows = -(-tokens // chunks)
    chunk = rows * vocab * (a + (c if c < a else 0))
    grad_logits = rows * vocab * c
    accumulator = head_grad * vocab * h * a
    product = head_grad * vocab * h * c  # a chunk's part of the head's gradient
    kept = tokens * h * c + accumulator
    first = max(chunk, grad_logits + product + (accumulator if c < a else 0))
    later = accumulator + max(chunk, grad_logits + product) if chunks > 1 else 0
    working = max(first, later) - accumulator + head_grad * tokens * h * c
    return kept, working


def _layers_of(model_parts) -> list[int]:
    return [int(key) for part in model_parts for key in part.layers.keys()]


@functools.cache
def register_fake_backend() -> None:
    """Backend "fake": torch's FakeProcessGroup, whose collectives return at once without communicating
    (enough to build one rank's shards). torch registers it only from its test utilities."""
    create = getattr(FakeProcessGroup, "_create_internal", FakeProcessGroup)  # named so in newer releases

    def create_fake_group(common, options):
        return create(common.group_rank, common.group_size, options)

    try:
        dist.Backend.register_backend("fake", create_fake_group, extended_api=True, devices=["cpu", "cuda"])
    except ValueError:  # already registered (torch's test utilities were imported)
        pass


def _plan_rank(
    cfg: JobConfig, args: ModelArgs, world_size: int, rank: int, dims, fake_group: bool = False
) -> tuple[RankPlan, str]:
    """Build `rank`'s part of the job on the meta device (over a fake process group of world_size ranks
    when `fake_group`) and count its memory -> (its RankPlan, the parallelism's description)."""
    p, t = cfg.parallelism, cfg.training
    if fake_group:
        register_fake_backend()
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DTensor's RNG warning about CPU meshes
            built = build_parallel_run(cfg, args, world_size, torch.device("meta"), _meta_model(cfg, args))
    finally:
        if fake_group:
            dist.destroy_process_group()
    row = _count(rank, built.description, built.model_parts, cfg)
    heads = [part.lm_head for part in built.model_parts if getattr(part, "lm_head", None) is not None]
    # A pipeline splits the local batch into micro-batches; under 1F1B stage s holds pp - s of them.
    n_micro = built.microbatches_per_step
    # Context parallel: each rank holds seq_len / cp tokens, and its attention the keys it gathers.
    tokens = t.local_batch_size // n_micro * t.seq_len // p.cp
    cp_rank = rank // p.tp % p.cp  # the rank at (p, r, s, c, t) is (((p * R + r) * S + s) * cp + c) * tp + t
    in_flight = 1 if p.pp == 1 else min(n_micro, p.pp - rank // (world_size // p.pp))
    tp = dims.tp if dims else 1
    row.activations = in_flight * activation_bytes(
        args,
        cfg,
        _layers_of(built.model_parts),
        bool(heads),
        tokens,
        tp=tp,
        moe_tp=dims.tp if dims and dims.ep_spans_tp else 1,
        keys_per_token=(2 * p.cp - cp_rank) / 2,
    )
    if heads:  # every micro-batch in flight keeps its loss's gradients; one loss runs at a time
        (head,) = heads
        chunked = built.loss_from_hidden and getattr(head, "plain_linear", False)
        kept, working = loss_bytes(args, cfg, tokens, tp, chunked, head_grad=chunked and head.weight.requires_grad)
        row.activations += in_flight * kept + working
    return row, built.description


def _in_forked_process(fn, *args):
    """fn(*args) in a forked child process: a fake process group and the meshes and shards built over
    it leave state behind in torch (e.g. offsets cached for the fake rank) that would leak into this
    process and into ranks it forks later."""
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()

    def child():
        try:
            results.put((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            results.put((False, e))

    proc = ctx.Process(target=child)
    proc.start()
    ok, value = results.get()
    proc.join()
    if not ok:
        raise value
    return value


def plan(cfg: JobConfig, world_size: int, args: ModelArgs | None = None) -> Plan:
    """Per-rank memory of `cfg` on `world_size` ranks (the largest rank of each pipeline stage)."""
    args = args or build_model_args(cfg)
    check_seq_len(cfg, args)
    p = cfg.parallelism
    single = is_single_process(cfg, world_size)
    dims = None if single else plan_parallelism(cfg, args, world_size)[0]  # the trainer's own checks, first
    # FSDP gives the first ranks of a dimension the larger chunks, and every data/tensor/expert rank of
    # a stage holds the same layers: rank 0 of each pipeline stage is its largest.
    ranks = [0] if single else [stage * (world_size // p.pp) for stage in range(p.pp)]
    rows, parallelism = [], "single process"
    for rank in ranks:
        if dist.is_initialized():  # inside a job: its own process group serves
            row, parallelism = _plan_rank(cfg, args, world_size, rank, dims)
        else:
            row, parallelism = _in_forked_process(_plan_rank, cfg, args, world_size, rank, dims, not single)
        rows.append(row)
    return Plan(world_size, parallelism, args.flops_per_token(cfg.training.seq_len), rows)


def check_fits(result: Plan, cfg: JobConfig, gpu_memory_gib: float) -> None:
    """Raise ConfigError naming the fix when the most loaded rank needs more than the device holds."""
    peak = result.peak
    if peak.total <= gpu_memory_gib * GIB:
        return
    states = sum(peak.params.values()) + sum(peak.grads.values()) + sum(peak.optimizer.values())
    if peak.activations > states:
        fix = (
            "set activation_checkpoint.mode = 'full'"
            if cfg.activation_checkpoint.mode != "full"
            else "lower training.local_batch_size or training.seq_len, or raise parallelism.tp"
        )
    else:
        fix = "raise the world size (more FSDP/EP ranks), or use parallelism.pp / lora"
    raise ConfigError(
        f"rank {peak.rank} needs {peak.total / GIB:.1f} GiB (parameters, gradients and optimizer "
        f"{states / GIB:.1f} GiB, activations {peak.activations / GIB:.1f} GiB) but the device holds "
        f"{gpu_memory_gib:g} GiB: {fix}"
    )


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps a figure >= 1: 37.52 GiB, 5.92 MiB, 0 B."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def human_flops(n: float) -> str:
    """FLOPs in the largest decimal unit that keeps a figure >= 1: 1.2 PFLOP, 3.4 GFLOP."""
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _memory(counter: Counter) -> str:
    parts = ", ".join(f"{dtype} {human_bytes(n)}" for dtype, n in sorted(counter.items()))
    return human_bytes(sum(counter.values())) + (f" ({parts})" if parts else "")


def report(result: Plan, cfg: JobConfig) -> str:
    t = cfg.training
    lines = [
        f"parallelism: {result.parallelism}",
        f"FLOPs/token (training, seq {t.seq_len}): {human_flops(result.flops_per_token)}; "
        f"per step: {human_flops(result.flops_per_token * t.global_batch_size * t.seq_len)}",
    ]
    for row in result.ranks:
        lines += [
            f"rank {row.rank}:",
            f"  parameters   {_memory(row.params)}",
            f"  gradients    {_memory(row.grads)}",
            f"  optimizer    {_memory(row.optimizer)}",
            f"  activations  {human_bytes(row.activations)} (estimate, +-25%; local batch "
            f"{t.local_batch_size} x {t.seq_len}"
            + (f" / cp {cfg.parallelism.cp}" if cfg.parallelism.cp > 1 else "")
            + f", checkpointing {cfg.activation_checkpoint.mode})",
            f"  total        {human_bytes(row.total)}",
        ]
    return "\n".join(lines)


def _placeholder_free(cfg: JobConfig) -> JobConfig:
    """Recipes point at HF directories that may not exist here: plan from the preset then."""
    hf = cfg.model.hf_config or cfg.checkpoint.initial_load_hf
    if not hf or os.path.exists(os.path.expanduser(hf)):
        return cfg
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, hf_config=""),
        checkpoint=dataclasses.replace(cfg.checkpoint, initial_load_hf=""),
    )
    print(f"[plan] {hf} does not exist here: using the {cfg.model.name!r} preset", flush=True)
    return cfg


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="python -m moonlight.plan",
        description=__doc__.splitlines()[0],
        epilog="Any other argument is a --section.key=value override, as train.py takes it.",
    )
    parser.add_argument("--config", metavar="FILE", help="the job's TOML config (as train.py takes it)")
    parser.add_argument("--world-size", type=int, required=True, help="the number of ranks (GPUs) of the job")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="the memory of one device (default 80)")

    def run() -> int:
        known, rest = parser.parse_known_args(argv)  # the rest: --section.key=value overrides
        if known.config is not None:
            rest = ["--config", known.config, *rest]
        if known.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1 (got {known.world_size})")
        if not known.gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory-gib must be > 0 (got {known.gpu_memory_gib:g}): the memory of one device")
        cfg = _placeholder_free(parse_args(rest))
        result = plan(cfg, known.world_size)
        print(report(result, cfg), flush=True)
        check_fits(result, cfg, known.gpu_memory_gib)
        print(f"fits: the most loaded rank needs {human_bytes(result.peak.total)} of {known.gpu_memory_gib:g} GiB")
        return 0

    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
