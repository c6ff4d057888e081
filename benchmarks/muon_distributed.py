"""Distributed Muon: optimizer share of the training step and communication volume, 1/2/4 ranks.

Runs the trainer (`train.toml`, FSDP over every rank: ``dp_shard=-1``) on forked gloo ranks and
measures, per rank and optimizer step, in one run:

- the share of the step spent in ``optimizers.step()`` for three optimizers:
  ``muon`` (each matrix orthogonalized once, on its owner: `moonlight.train.muon`),
  ``muon-redundant`` (every rank gathers and orthogonalizes every matrix, as the paper's
  Algorithm 1 and this stack before), ``adamw``;
- bytes each rank sends: FSDP's parameter all-gather + gradient reduce-scatter (run without reshard
  after forward, so exactly what distributed AdamW moves), and Muon's two all-to-alls on top (ring
  collectives count (N-1)/N of the buffer).

    python benchmarks/muon_distributed.py [--worlds 1 2 4] [--steps 6] [--warmup 2] [--section.key=value ...]

Ratios are against baselines measured in the same run. The redundant baseline's gathers run through
DTensor and are not counted (n/a): every rank receives (N-1)/N of every shared matrix. On a CPU the
trainer runs NS in fp32, so the exchange moves fp32; on GPUs it runs (and travels) in bf16, half
those bytes, printed alongside.
"""

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package: resolve imports from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate  # noqa: E402

from moonlight.train.config import load_config  # noqa: E402
from moonlight.train.muon import ns_flops, plan_orthogonalization, zeropower_via_newtonschulz  # noqa: E402
from moonlight.train.optim import Muon  # noqa: E402
from moonlight.train.trainer import Trainer  # noqa: E402
from tests.dist import run_ranks  # noqa: E402
from benchmarks.peers import progress  # noqa: E402


def _redundant_orthogonalize(self, work):
    """The baseline: gather each full matrix on EVERY rank sharing it and orthogonalize it there."""
    out = []
    for group, p, u in work:
        o = u
        if isinstance(p, DTensor):
            mesh, placements = p.device_mesh, tuple(p.placements)
            keep = [pl if p.ndim == 3 and getattr(pl, "dim", None) == 0 else Replicate() for pl in placements]
            o = DTensor.from_local(u, mesh, placements, shape=p.shape, stride=p.stride())
            o = o.redistribute(mesh, keep).to_local()
        o = zeropower_via_newtonschulz(o, group["ns_steps"], group["ns_coefficients"], group["eps"], group["ns_dtype"])
        if isinstance(p, DTensor):
            o = DTensor.from_local(o, mesh, keep, shape=p.shape, stride=p.stride()).redistribute(mesh, placements)
            o = o.to_local()
        out.append(o)
    return out


class _CommCounter:
    """Bytes this rank sends in FSDP's collectives and in Muon's all-to-alls (patched torch.distributed)."""

    def __init__(self):
        self.fsdp = self.muon = self.muon_elements = 0
        self.in_muon = False
        # FSDP's collectives: torch 2.13 names them *_single, 2.11 all_gather_into_tensor / reduce_scatter_tensor
        ag_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        rs_name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
        ag, rs, a2a = getattr(dist, ag_name), getattr(dist, rs_name), dist.all_to_all_single

        def all_gather_single(output, input, group=None, async_op=False):
            n = dist.get_world_size(group)
            self.fsdp += (n - 1) * output.numel() * output.element_size() // n
            return ag(output, input, group=group, async_op=async_op)

        def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            n = dist.get_world_size(group)
            self.fsdp += (n - 1) * input.numel() * input.element_size() // n
            return rs(output, input, op=op, group=group, async_op=async_op)

        def all_to_all_single(
            output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
        ):
            if self.in_muon:
                own = input_split_sizes[dist.get_rank(group)] if input_split_sizes else 0
                self.muon_elements += input.numel() - own
                self.muon += (input.numel() - own) * input.element_size()
            return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        setattr(dist, ag_name, all_gather_single)
        setattr(dist, rs_name, reduce_scatter_single)
        dist.all_to_all_single = all_to_all_single

    def reset(self):
        self.fsdp = self.muon = self.muon_elements = 0


def _measure(rank, world, optimizer, steps, warmup, overrides):
    comm = _CommCounter() if world > 1 else None
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        total = steps + warmup
        name = "adamw" if optimizer == "adamw" else "muon"
        cfg = load_config(
            "train.toml",
            [
                f"--training.steps={total}",
                "--checkpoint.enable=false",
                "--parallelism.dp_shard=-1",
                f"--optimizer.name={name}",
                "--lr_scheduler.warmup_steps=1",
                f"--job.dump_folder={tmp}",
                "--metrics.log_freq=1000",
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        muon = next((o for o in trainer.optimizers if isinstance(o, Muon)), None)
        if muon is not None:
            if optimizer == "muon-redundant":
                muon._orthogonalize = types.MethodType(_redundant_orthogonalize, muon)
            orthogonalize = muon._orthogonalize

            def counted(work):
                if comm:
                    comm.in_muon = True
                try:
                    return orthogonalize(work)
                finally:
                    if comm:
                        comm.in_muon = False

            muon._orthogonalize = counted
        step_opt = trainer.optimizers.step
        opt_times = []

        def timed_step(closure=None):
            t0 = time.perf_counter()
            step_opt(closure)
            opt_times.append(time.perf_counter() - t0)

        trainer.optimizers.step = timed_step
        step_times = []
        for i in range(total):
            if i == warmup and comm:
                comm.reset()
            step_times.append(trainer.train_step()["step_time_s"])
            trainer.step += 1
        # Newton-Schulz FLOPs this rank runs per step (its owned matrices; all of them when redundant)
        params = [p for o in trainer.optimizers if isinstance(o, Muon) for g in o.param_groups for p in g["params"]]
        plans = plan_orthogonalization(params, [cfg.optimizer.ns_steps] * len(params))
        ns_flops_here = sum(
            ns_flops(*plan.shape, cfg.optimizer.ns_steps)
            * (plan.count if optimizer == "muon-redundant" else sum(o == plan.me for o in plan.owners))
            for plan in plans
        )
    share = statistics.median(o / s for o, s in zip(opt_times[warmup:], step_times[warmup:]))
    per_step = (lambda b: b / steps) if comm else (lambda b: 0)
    return dict(
        share=share,
        step_s=statistics.median(step_times[warmup:]),
        fsdp_bytes=per_step(comm.fsdp if comm else 0),
        muon_bytes=per_step(comm.muon if comm else 0),
        ns_flops=ns_flops_here,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args, overrides = ap.parse_known_args()
    # parameters gathered once per step (no reshard after forward): FSDP then moves exactly what
    # distributed AdamW does, one gradient reduce-scatter + one parameter all-gather
    overrides = [
        "--training.seq_len=64",
        "--training.global_batch_size=8",
        "--model.kernels=torch",
        "--parallelism.fsdp_reshard_after_forward=never",
        "--metrics.device_peak_flops=1e11",
        *overrides,
    ]
    print(f"debug model, FSDP over all ranks, gloo on CPU, {args.steps} measured steps; per rank, median")
    print(
        f"{'ranks':>5} {'optimizer':>15} {'step s':>8} {'opt share':>9} {'FSDP MB/step':>12} {'Muon MB/step':>12} "
        f"{'(Muon+FSDP)/FSDP':>16} {'with bf16 NS':>12} {'NS GFLOP max/min':>14}"
    )
    for world in args.worlds:
        local = [f"--training.local_batch_size={8 // world}"]
        for optimizer in ("adamw", "muon-redundant", "muon"):
            progress(f"{world} rank(s), {optimizer}: {args.steps} steps")
            rows = run_ranks(_measure, world, optimizer, args.steps, args.warmup, overrides + local)
            share = statistics.mean(r["share"] for r in rows)
            step_s = statistics.mean(r["step_s"] for r in rows)
            fsdp = statistics.mean(r["fsdp_bytes"] for r in rows)
            extra = statistics.mean(r["muon_bytes"] for r in rows)
            flops = [r["ns_flops"] for r in rows]
            balance = f"{max(flops) / 1e9:.2f}/{min(flops) / 1e9:.2f}" if optimizer != "adamw" else "-"
            ratio = f"{(fsdp + extra) / fsdp:.3f}" if fsdp and optimizer == "muon" else "-"
            bf16 = f"{(fsdp + extra / 2) / fsdp:.3f}" if fsdp and optimizer == "muon" else "-"
            muon_mb = f"{extra / 1e6:.3f}" if optimizer == "muon" else "n/a" if optimizer == "muon-redundant" else "0"
            print(
                f"{world:>5} {optimizer:>15} {step_s:>8.3f} {100 * share:>8.1f}% {fsdp / 1e6:>12.3f} "
                f"{muon_mb:>12} {ratio:>16} {bf16:>12} {balance:>14}",
                flush=True,
            )


if __name__ == "__main__":
    main()
