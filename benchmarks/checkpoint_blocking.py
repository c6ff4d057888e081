"""How long a checkpoint save blocks training: checkpoint.async_mode "" (sync) against "async" on the
same model and AdamW state, alternated in one process. Blocked = the time `Checkpointer.save` holds the
training loop (async: staging the state to CPU copies); the background write is finished by `wait()`,
timed separately here (in a run it overlaps the next steps). Prints medians and the blocked-time ratio.

    python benchmarks/checkpoint_blocking.py [--pairs 3] [--threads 2]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from moonlight.checkpoint.state import Checkpointer  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.train.config import CheckpointSection  # noqa: E402
from moonlight.train.optim import build_optimizers  # noqa: E402
from moonlight.train.schedule import LRSchedulerSection  # noqa: E402
from benchmarks.peers import progress  # noqa: E402

# ~27 M parameters (~107 MB fp32; with AdamW's two moments ~320 MB per checkpoint)
ARGS = ModelArgs.preset(
    "debug",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    n_routed_experts=16,
    kernels="torch",
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    model = Moonlight(ARGS)
    model.init_weights()
    opts = build_optimizers(model.named_parameters(), "adamw", lr=1e-3)
    model(torch.randint(0, ARGS.vocab_size, (1, 8))).float().pow(2).mean().backward()
    opts.step()  # AdamW moments exist
    scheds = LRSchedulerSection(warmup_steps=1).build(opts, total_steps=10)
    times = {"sync": [], "async": [], "async_wait": []}
    with tempfile.TemporaryDirectory() as tmp:
        cks = {
            mode: Checkpointer(
                CheckpointSection(
                    enable=True, interval=1, keep_latest_k=1, async_mode="async" if mode == "async" else ""
                ),
                f"{tmp}/{mode}",
                [model],
                opts,
                scheds,
                None,
            )
            for mode in ("sync", "async")
        }
        for step in range(1, ns.pairs + 1):
            progress(f"pair {step}/{ns.pairs}")
            for mode, ck in cks.items():
                t0 = time.perf_counter()
                ck.save(step)
                times[mode].append(time.perf_counter() - t0)
                if mode == "async":
                    t0 = time.perf_counter()
                    ck.wait()
                    times["async_wait"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"checkpoint of {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params + AdamW, "
        f"{ns.pairs} saves each, medians:"
    )
    print(f"  sync:  blocked {med['sync'] * 1e3:.0f} ms")
    print(
        f"  async: blocked {med['async'] * 1e3:.0f} ms (staging), then written in the background "
        f"({med['async_wait'] * 1e3:.0f} ms more in wait())"
    )
    print(f"  blocked time async / sync = {med['async'] / med['sync']:.2f}")


if __name__ == "__main__":
    main()
