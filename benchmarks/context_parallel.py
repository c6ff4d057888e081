"""Context parallel: bytes a rank moves per layer for MLA's key exchange, against a per-head K/V ring.

Runs the model on forked gloo ranks under `moonlight.parallel.context` (every rank holds a zig-zag
slice of each sequence), one forward and one backward, and counts the collectives they issue with
a TorchDispatchMode that sees every functional collective: the sizes of the tensors passed, turned
into the bytes one rank sends in a ring implementation (all-gather and reduce-scatter: (n-1)/n of
the full buffer; all-reduce: twice that).

The baseline is what ring attention with per-head keys and values (as for standard multi-head
attention) would send per rank and layer: forward, its K and V chunk to each of the other cp-1 ranks,
``(cp - 1) * tokens * heads * (qk_head_dim + v_head_dim)`` elements; backward, K and V again plus
their gradients, twice that. It is computed from the same config, not run.

Two configs in one run: the debug model, and Moonlight-16B's attention (hidden 2048, 16 heads,
kv_lora_rank 512, rope 64, qk 192 / v 128) on two layers with a small vocabulary and few experts
(the exchange does not depend on depth, vocabulary or experts).

    python benchmarks/context_parallel.py [--cp 2 4] [--seq-len 256] [--batch 2]

The counts are exact (they do not depend on timing); they are the same on CUDA in bf16 at half the bytes
of these fp32 runs, for both sides of the ratio.
"""

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

# run as a script: resolve `benchmarks.*` and `tests.*` from the repository root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from benchmarks.peers import progress  # noqa: E402
from moonlight.parallel.context import apply_context_parallel, zigzag_slice  # noqa: E402
from tests.dist import run_ranks  # noqa: E402

CONFIGS = {
    "debug": ModelArgs.preset("debug", kernels="torch"),
    "moonlight-attention": dataclasses.replace(
        ModelArgs(),
        num_hidden_layers=2,
        vocab_size=1024,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=256,
        intermediate_size=1024,
        kernels="torch",
    ),
}


class CollectiveBytes(TorchDispatchMode):
    """Bytes this rank sends, per functional collective (op name), in ring implementations."""

    def __init__(self):
        super().__init__()
        self.sent = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("_c10d_functional", "_c10d_functional_autograd"):
            name, t = func._opname, args[0]
            size = t.numel() * t.element_size()
            if name == "all_gather_into_tensor":
                self.sent[name] += size * (args[1] - 1)  # args: input, group_size, group_name
            elif name == "reduce_scatter_tensor":
                self.sent[name] += size // args[2] * (args[2] - 1)  # input, reduce_op, group_size, group_name
            elif name == "all_reduce":
                n = torch.distributed.get_world_size()
                self.sent[name] += 2 * size * (n - 1) // n
        return func(*args, **kwargs)


def _measure(rank, world, config, seq_len, batch):
    args = CONFIGS[config]
    torch.manual_seed(0)
    model = Moonlight(args)
    model.init_weights()
    apply_context_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq_len).expand(batch, seq_len)
    tokens, labels, positions = (zigzag_slice(t, world, rank) for t in (tokens, tokens.roll(-1, 1), positions))
    forward, backward = CollectiveBytes(), CollectiveBytes()
    with forward:
        loss = F.cross_entropy(model(tokens, positions=positions).flatten(0, 1), labels.flatten(), reduction="sum")
    with backward:
        loss.backward()
    return dict(forward.sent), dict(backward.sent)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    opts = parser.parse_args()
    print(
        "| config | cp | per token per layer: latent + k_pe / per-head K+V | fwd bytes/layer/rank: CP / K/V ring "
        "| bwd bytes/layer/rank: CP / K/V ring | ring / CP |"
    )
    print("|---|---|---|---|---|---|")
    for config, args in CONFIGS.items():
        for cp in opts.cp:
            progress(f"{config}, cp={cp}: counting one step's collective bytes on {cp} ranks")
            forward, backward = run_ranks(_measure, cp, config, opts.seq_len, opts.batch)[0]
            layers, moe_layers = args.num_hidden_layers, args.num_hidden_layers - args.first_k_dense_replace
            tokens = opts.batch * opts.seq_len // cp  # held by each rank
            latent = args.kv_lora_rank + args.qk_rope_head_dim
            per_head = args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)
            ring_fwd = (cp - 1) * tokens * per_head * 4  # fp32
            cp_fwd = forward.get("all_gather_into_tensor", 0) / layers
            cp_bwd = backward.get("reduce_scatter_tensor", 0) / layers
            assert cp_fwd == (cp - 1) * tokens * latent * 4, (cp_fwd, forward)  # what the docstring promises
            aux = (forward.get("all_reduce", 0) + backward.get("all_reduce", 0)) / max(moe_layers, 1)
            print(
                f"| {config} | {cp} | {latent} / {per_head} | {cp_fwd / 1e3:,.1f} kB / {ring_fwd / 1e3:,.1f} kB "
                f"| {cp_bwd / 1e3:,.1f} kB / {2 * ring_fwd / 1e3:,.1f} kB "
                f"| fwd {ring_fwd / cp_fwd:.1f}x, fwd+bwd {3 * ring_fwd / (cp_fwd + cp_bwd):.1f}x |"
            )
            print(f"|   | | MoE aux-loss sums: {aux / 1e3:,.2f} kB per MoE layer (fwd+bwd) | | | |")


if __name__ == "__main__":
    main()
