"""Forward+backward throughput of our model against transformers' DeepseekV3ForCausalLM and torchtitan's
DeepSeek-V3 model (benchmarks/peers.py lists the CPU adjustments torchtitan needs).

Same config and weights (`PEER_CONFIG` of benchmarks/peers.py: hidden 256, 4 layers, 8 experts
top-2, batch 4 x 256, fp32; each system loads the same HF files through its own loader; each trains on the mean
next-token cross-entropy through its own trainer's path: the peers on their logits, ours from the hidden
states as `cross_entropy_from_hidden`), runs alternated in one process in
rotating order so machine noise hits all alike; prints the median per-round speed ratio (with min/max)
and each model's MFU against a GEMM peak measured in the same run.

    python benchmarks/model_throughput.py [--pairs 8] [--batch 4] [--seq 256] [--threads 2] [--compile]
                                          [--threads 1 --cpu-time]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package: resolve imports from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.peers import PEER_CONFIG, benchmark_device, build_all, progress, save_peer_checkpoint  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.hf import load_hf  # noqa: E402
from moonlight.model.loss import cross_entropy_from_hidden  # noqa: E402
from moonlight.parallel.tensor import reduce_token_losses  # noqa: E402
from moonlight.parallel.compile import apply_compile  # noqa: E402
from moonlight.train.metrics import measure_peak_flops, peak_flops  # noqa: E402


def logits_loss(forward):
    """The peers' training loss: the mean next-token cross-entropy on their [B, S, V] logits (what
    torchtitan's trainer does; transformers' `labels=` does the same in fp32)."""
    return lambda tokens: F.cross_entropy(forward(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def labels_loss(model):
    """Our trainer's loss: the same mean from `cross_entropy_from_hidden`, the chunked cross-entropy
    from the hidden states (moonlight/model/loss.py), the last position ignored as above."""

    def loss(tokens):
        labels = F.pad(tokens[:, 1:], (0, 1), value=-100)
        hidden = model(tokens, return_hidden=True)
        return reduce_token_losses(cross_entropy_from_hidden(hidden, model.lm_head, labels), labels)

    return loss


def step_time(loss, params, tokens, clock=time.perf_counter) -> float:
    for p in params:
        p.grad = None
    t0 = clock()
    loss(tokens).backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return clock() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also run ours with training.compile's regional inductor")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by this process's CPU time, not the wall clock: on a shared machine with "
        "--threads 1 it leaves out the time spent waiting for a core",
    )
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (idle threads spin, so CPU time is not step time)")
    clock = time.process_time if args.cpu_time else time.perf_counter
    device = benchmark_device(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_peer_checkpoint(tmp)
        model_args = ModelArgs.from_hf_config(tmp)
        models = build_all(model_args, Path(tmp), device, max_seq_len=args.seq)
        if args.compile:
            models["ours compiled"] = apply_compile(
                load_hf(tmp, dtype=torch.float32, device=device, aux_loss_alpha=0.0).train(), "inductor"
            )
    tokens = torch.randint(0, PEER_CONFIG["vocab_size"], (args.batch, args.seq), device=device)
    forwards = {name: (lambda x, m=m: m(x).logits) if name == "transformers" else m for name, m in models.items()}
    with torch.no_grad():
        reference = forwards["transformers"](tokens)
        for name, fwd in ((n, f) for n, f in forwards.items() if n != "transformers"):
            print(f"max |logit difference| {name} vs transformers: {(fwd(tokens) - reference).abs().max().item():.2e}")

    runs = {
        name: (
            labels_loss(models[name]) if name.startswith("ours") else logits_loss(fwd),
            list(models[name].parameters()),
        )
        for name, fwd in forwards.items()
    }
    with torch.no_grad():
        losses = {name: loss(tokens).item() for name, (loss, _) in runs.items()}
    print("loss " + ", ".join(f"{name} {value:.6f}" for name, value in losses.items()))
    progress(f"warm-up of {', '.join(runs)}")
    for loss, params in runs.values():  # warm-up (twice: a compiled model compiles its backward on the first)
        step_time(loss, params, tokens)
        step_time(loss, params, tokens)
    names = list(runs)
    times = {name: [] for name in runs}
    for i in range(args.pairs):  # rotate the order so no system always runs first
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(step_time(*runs[name], tokens, clock))
        progress(f"round {i + 1}/{args.pairs}: " + ", ".join(f"{name} {t[-1]:.2f}s" for name, t in times.items()))
    # this table's MFU is against the GEMM peak timed in the same run on CPU (the trainer's is a fixed nominal one)
    peak = measure_peak_flops(device) if device.type == "cpu" else peak_flops(device, torch.float32)
    flops_per_token = model_args.flops_per_token(args.seq)
    n_tokens = args.batch * args.seq
    print(
        f"device {device}, {args.threads} threads, {'CPU' if args.cpu_time else 'wall'} time, "
        f"batch {args.batch} x seq {args.seq}, "
        f"GEMM peak {peak / 1e9:.1f} GFLOP/s, model {flops_per_token / 1e6:.2f} MFLOP/token"
    )
    for name, ts in times.items():
        tps = n_tokens / statistics.median(ts)
        print(f"{name:>13}: {tps:10,.0f} tokens/s  MFU {100 * flops_per_token * tps / peak:5.1f}%")
    for ours in (n for n in names if n.startswith("ours")):
        for peer in (n for n in names if not n.startswith("ours")):
            ratios = [p / o for p, o in zip(times[peer], times[ours])]
            print(
                f"speed-up {ours} / {peer}: median {statistics.median(ratios):.2f}x "
                f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} rounds)"
            )


if __name__ == "__main__":
    main()
