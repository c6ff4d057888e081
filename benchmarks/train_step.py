"""Full training-step throughput and MFU (data, forward, backward, clipping, optimizer, bias update).

Runs the trainer in-process on one rank with `train.toml` plus overrides, and reports the median
tokens/s and MFU over the measured steps, the share of the step spent outside forward+backward
(optimizer, clipping, bias update), measured in the same run as a ratio, and the optimizer's own time:

    python benchmarks/train_step.py [--steps 8] [--warmup 2] [--config train.toml] [--section.key=value ...]

e.g. `python benchmarks/train_step.py --optimizer.name=adamw --training.seq_len=256`. For multi-rank
runs use torchrun with train.py: its metrics.jsonl has tokens_per_s and mfu_pct per step.
benchmarks/gpu_suite.py runs `measure` on the Moonlight-width slice with Muon and with AdamW.
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package: resolve imports from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from moonlight.train.config import load_config  # noqa: E402
from moonlight.train.trainer import Trainer  # noqa: E402
from benchmarks.peers import progress  # noqa: E402


def _device_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Medians over `steps` trainer steps after `warmup` ones: tokens/s, MFU, step, forward+backward
    and optimizer seconds, and the share of the step outside forward+backward. The device is waited
    for around forward+backward and around the optimizer step (four host syncs a step, timing only)."""
    total = steps + warmup
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            config,
            [
                f"--training.steps={total}",
                "--checkpoint.enable=false",
                f"--lr_scheduler.warmup_steps={min(total, 2)}",
                f"--job.dump_folder={tmp}",
                *overrides,
            ],
        )
        trainer = Trainer(cfg)
        trainer.time_forward_backward = True
        device = trainer.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer_s, step_optimizers = [], trainer.optimizers.step

        def timed_optimizer_step(closure=None):
            start = _device_clock(device)
            step_optimizers(closure)
            optimizer_s.append(_device_clock(device) - start)

        trainer.optimizers.step = timed_optimizer_step
        values = []
        for i in range(total):
            values.append(trainer.train_step())
            trainer.step += 1
            progress(f"step {i + 1}/{total}{' (warm-up)' if i < warmup else ''}: {values[-1]['step_time_s']:.2f}s")
        result = {
            "model": cfg.model.name,
            "optimizer": cfg.optimizer.name,
            "device": str(device),
            "micro_batches": trainer.grad_accum,
            "tokens_per_step": cfg.training.global_batch_size * cfg.training.seq_len,
            "peak_flops": trainer.peak_flops,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        trainer.metrics.close()
        trainer.lock.release()
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measured = values[warmup:]

    def median(key):
        return statistics.median(v[key] for v in measured)

    result.update(
        step_s=median("step_time_s"),
        tokens_per_s=median("tokens_per_s"),
        mfu_pct=median("mfu_pct"),
        forward_backward_s=median("forward_backward_s"),
        optimizer_s=statistics.median(optimizer_s[warmup:]),
        tokens_per_s_min=min(v["tokens_per_s"] for v in measured),
        tokens_per_s_max=max(v["tokens_per_s"] for v in measured),
        outside_forward_backward_pct=100
        * statistics.median((v["step_time_s"] - v["forward_backward_s"]) / v["step_time_s"] for v in measured),
    )
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--config", default="train.toml")
    args, overrides = ap.parse_known_args()
    r = measure(args.config, overrides, args.steps, args.warmup)
    print(
        f"model {r['model']}, optimizer {r['optimizer']}, {r['micro_batches']} micro-batches, "
        f"{r['tokens_per_step']} tokens/step, device {r['device']}, peak {r['peak_flops'] / 1e9:.1f} GFLOP/s"
    )
    print(
        f"tokens/s median {r['tokens_per_s']:,.0f} (min {r['tokens_per_s_min']:,.0f}, "
        f"max {r['tokens_per_s_max']:,.0f})  MFU median {r['mfu_pct']:.1f}%"
    )
    print(
        f"outside forward+backward (optimizer, clipping, bias update): {r['outside_forward_backward_pct']:.0f}% "
        f"of the step; optimizer step {1e3 * r['optimizer_s']:.1f} ms of {1e3 * r['step_s']:.1f} ms"
    )


if __name__ == "__main__":
    main()
