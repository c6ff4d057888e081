"""Greedy generation speed and KV-cache bytes per token: moonlight.generate against transformers'
`generate` on the same weights (`PEER_CONFIG` of benchmarks/peers.py, fp32), alternated in one
process; prints the median per-pair speed ratio with min/max, for each prompt length.

    python benchmarks/generate.py [--pairs 5] [--batch 1] [--prompt-lens 64,1024] [--new-tokens 128] [--threads 2]
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
import transformers  # noqa: E402

from benchmarks.peers import PEER_CONFIG, benchmark_device, progress, save_peer_checkpoint  # noqa: E402
from moonlight.hf import load_hf  # noqa: E402
from moonlight.generate import cache_bytes_per_token, generate, per_head_kv_bytes_per_token  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-lens", default="64,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    device = benchmark_device(args.threads)
    progress("building the peer model for transformers and for us")
    with tempfile.TemporaryDirectory() as tmp:
        save_peer_checkpoint(tmp)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
        ours = load_hf(tmp, dtype=torch.float32, device=device).eval()
    hf.generation_config.eos_token_id = None  # always generate new_tokens tokens
    n = args.new_tokens
    runs = {
        "transformers": lambda ids: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                min_new_tokens=n, do_sample=False, pad_token_id=0),
        "ours": lambda ids: generate(ours, ids, n),
    }

    a = ours.args
    with torch.no_grad():
        probe = hf(torch.zeros(1, 16, dtype=torch.long, device=device), use_cache=True).cache
    hf_cache = sum(layer.keys.nbytes + layer.values.nbytes for layer in probe.layers) // 16
    ours_cache = cache_bytes_per_token(a, torch.float32)
    per_head = per_head_kv_bytes_per_token(a, torch.float32)
    print(f"KV cache bytes per token (fp32, {a.num_hidden_layers} layers): ours {ours_cache} "
          f"(kv_lora_rank {a.kv_lora_rank} + rope {a.qk_rope_head_dim}), transformers {hf_cache}: ratio "
          f"{hf_cache / ours_cache:.2f}x; a per-head K/V cache ({a.num_attention_heads} heads x "
          f"({a.qk_head_dim}+{a.v_head_dim})) would hold {per_head}: {per_head / ours_cache:.2f}x ours", flush=True)

    for prompt_len in [int(s) for s in args.prompt_lens.split(",")]:
        ids = torch.randint(0, PEER_CONFIG["vocab_size"], (args.batch, prompt_len), device=device)
        progress(f"prompt {prompt_len}: warm-up run of each")
        outs = {name: run(ids) for name, run in runs.items()}  # warm-up, and the tokens to compare
        agree = (outs["ours"][:, prompt_len:] == outs["transformers"][:, prompt_len:]).float().mean().item()
        times = {name: [] for name in runs}
        for i in range(args.pairs):
            for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                times[name].append(timed(lambda: runs[name](ids))[0])
            progress(f"prompt {prompt_len}: pair {i + 1}/{args.pairs}: "
                     + ", ".join(f"{name} {t[-1]:.1f}s" for name, t in times.items()))
        ratios = [h / o for h, o in zip(times["transformers"], times["ours"])]
        tps = {name: args.batch * n / statistics.median(t) for name, t in times.items()}
        print(f"batch {args.batch}, prompt {prompt_len}, {n} new tokens: ours {tps['ours']:.0f} tok/s, "
              f"transformers {tps['transformers']:.0f} tok/s; speed ratio median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.pairs} pairs); greedy tokens agree {agree:.0%}",
              flush=True)


if __name__ == "__main__":
    main()
