"""Full training-step throughput and MFU (data, forward, backward, clipping, optimizer, bias update).

Runs the trainer in-process on one rank with `train.toml` plus overrides, and reports the median
tokens/s and MFU over the measured steps, and the share of the step spent outside forward+backward
(optimizer, clipping, bias update), measured in the same run as a ratio:

    python benchmarks/train_step.py [--steps 8] [--warmup 2] [--config train.toml] [--section.key=value ...]

e.g. `python benchmarks/train_step.py --optimizer.name=adamw --training.seq_len=256`. For multi-rank
layouts use torchrun with train.py: its metrics.jsonl has tokens_per_s and mfu_pct per step.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package: resolve imports from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

from moonlight.train.config import load_config  # noqa: E402
from moonlight.train.trainer import Trainer  # noqa: E402
from benchmarks.peers import progress  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--config", default="train.toml")
    args, overrides = ap.parse_known_args()
    total = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"--training.steps={total}", "--checkpoint.enable=false",
                                        f"--lr_scheduler.warmup_steps={min(total, 2)}", f"--job.dump_folder={tmp}",
                                        *overrides])
        trainer = Trainer(cfg)
        trainer.time_forward_backward = True
        steps = []
        for i in range(total):
            steps.append(trainer.train_step())
            trainer.step += 1
            progress(f"step {i + 1}/{total}{' (warm-up)' if i < args.warmup else ''}: {steps[-1]['step_time_s']:.2f}s")
    measured = steps[args.warmup:]
    share = statistics.median((v["step_time_s"] - v["forward_backward_s"]) / v["step_time_s"] for v in measured)
    print(f"model {cfg.model.name}, optimizer {cfg.optimizer.name}, {cfg.training.global_batch_size} x "
          f"{cfg.training.seq_len} tokens/step, device {trainer.device}, peak {trainer.peak_flops / 1e9:.1f} GFLOP/s")
    print(f"tokens/s median {statistics.median(v['tokens_per_s'] for v in measured):,.0f} "
          f"(min {min(v['tokens_per_s'] for v in measured):,.0f}, max {max(v['tokens_per_s'] for v in measured):,.0f})"
          f"  MFU median {statistics.median(v['mfu_pct'] for v in measured):.1f}%")
    print(f"outside forward+backward (optimizer, clipping, bias update): {100 * share:.0f}% of the step")


if __name__ == "__main__":
    main()
