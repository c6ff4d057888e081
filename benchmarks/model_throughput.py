"""Forward+backward throughput of our model against transformers' DeepseekV3ForCausalLM.

Same config and weights (the peers.md config: hidden 256, 4 layers, 8 experts top-2, batch 4 x 256,
fp32), runs alternated in one process so machine noise hits both alike; prints the median per-pair
speed ratio (with min/max) and each model's MFU against a GEMM peak measured in the same run.

    python benchmarks/model_throughput.py [--pairs 8] [--batch 4] [--seq 256] [--threads 2]
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
import transformers  # noqa: E402

from moonlight.hf import load_hf  # noqa: E402
from moonlight.train.metrics import peak_flops  # noqa: E402

PEER_CONFIG = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=2, n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
    tie_word_embeddings=False, num_nextn_predict_layers=0, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
)


def step_time(forward, params, tokens) -> float:
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    logits = forward(tokens)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**PEER_CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).train()
        ours = load_hf(tmp, dtype=torch.float32, device=device, aux_loss_alpha=0.0).train()
    tokens = torch.randint(0, PEER_CONFIG["vocab_size"], (args.batch, args.seq), device=device)
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    print(f"max |logit difference| ours vs transformers: {diff:.2e}")

    runs = {"transformers": (lambda x: hf(x).logits, list(hf.parameters())),
            "ours": (ours, list(ours.parameters()))}
    for fwd, params in runs.values():  # warm-up
        step_time(fwd, params, tokens)
    times = {name: [] for name in runs}
    for i in range(args.pairs):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(step_time(*runs[name], tokens))
    peak = peak_flops(device, torch.float32)
    flops_per_token = ours.args.flops_per_token(args.seq)
    n_tokens = args.batch * args.seq
    print(f"device {device}, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
          f"GEMM peak {peak / 1e9:.1f} GFLOP/s, model {flops_per_token / 1e6:.2f} MFLOP/token")
    for name, ts in times.items():
        tps = n_tokens / statistics.median(ts)
        print(f"{name:>13}: {tps:10,.0f} tokens/s  MFU {100 * flops_per_token * tps / peak:5.1f}%")
    ratios = [h / o for h, o in zip(times["transformers"], times["ours"])]
    print(f"speed-up ours / transformers: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
