"""CPU proxies for the GPU step (issue 20), deterministic counts, no timings:

- launches: non-view ops dispatched in one forward + backward, each one GPU kernel, roughly (a Triton
  kernel counts once, and so does each op around it);
- copy bytes: bytes written by copy and cast ops (`_to_copy`, `copy_`, `clone`, ...), and by fills
  (`zero_`, `fill_`, `zeros`) that later writes may overwrite;
- graph breaks (and graphs) of the step under `training.compile` (regional, each block compiled).

    python benchmarks/cpu_proxies.py [--json PATH] [--fast] [--check]

Models: the debug preset (fp32, CPU, torch and Triton kernel paths) and the Moonlight-width slice
(4 layers: 1 dense + 3 MoE, bf16, 1 x 4096, on the meta device: shapes only, nothing is computed).
--fast: the debug model only. --check: exit 1 when a count exceeds its budget in BUDGETS. The loss is
the trainer's (labels -> chunked cross-entropy).
"""

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.op_counter import OpCounter  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.model.loss import cross_entropy_from_hidden  # noqa: E402
from moonlight.model.model import MLA, LocalKeyExchange  # noqa: E402
from moonlight.parallel.compile import apply_compile  # noqa: E402


@torch.library.custom_op("cpu_proxies::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@_attention.register_fake
def _(q, k, v, scale):  # laid out [B, S, heads, D] as the GPU kernels write it: the caller's transpose is free
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)


@torch.library.custom_op("cpu_proxies::attention_backward", mutates_args=())
def _attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError("a stand-in for the meta device only")


@_attention_backward.register_fake
def _(grad, q, k, v, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.scale = inputs[3]


_attention.register_autograd(
    lambda ctx, grad: (*_attention_backward(grad, *ctx.saved_tensors, ctx.scale), None), setup_context=_attention_setup
)


class FusedAttention(LocalKeyExchange):
    """The GPU's attention on the meta device: one fused kernel forward and one backward, unpadded v
    (the math fallback the meta device takes would count a dozen ops and fp32 casts per call)."""

    def attention(self, q, k, v, scale, mask):
        return _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)


# Today's counts with ~3% slack (the slice's: tests/single/test_cpu_proxies.py; --check: all): lower them
# as the step gets leaner.
BUDGETS = {
    "slice bf16 meta": {"launches": 461, "copy_bytes": 5.7e9, "fill_bytes": 4.45e3},
    "debug fp32 torch": {"launches": 778, "copy_bytes": 4.05e5, "fill_bytes": 4.2e5},
    "debug fp32 triton": {"launches": 401, "copy_bytes": 2.7e5, "fill_bytes": 970},
}


def build(args: ModelArgs, device: str, dtype: torch.dtype) -> Moonlight:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Moonlight(args)
    if device != "meta":
        model.to_empty(device=device)
        model.init_weights()
    else:  # as on a GPU: fused attention of v's true width
        for module in model.modules():
            if isinstance(module, MLA):
                module.key_exchange, module.pad_v = FusedAttention(), False
    return model.to(dtype).train()


def step_counts(model: Moonlight, tokens: torch.Tensor) -> dict:
    """Counts of one forward + backward with the trainer's loss, after one warm-up step."""

    def step():
        model.zero_grad(set_to_none=True)
        cross_entropy_from_hidden(model(tokens, return_hidden=True), model.lm_head, tokens).backward()

    if tokens.device.type != "meta":
        step()  # lazy work (tables, caches) out of the count
    counter = OpCounter()
    with counter:
        step()
    return counter.summary()


def graph_breaks(args: ModelArgs, tokens: torch.Tensor) -> dict:
    """Graph breaks and graphs of a forward + backward under training.compile (aot_eager: the same
    graphs as inductor, without code generation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = apply_compile(build(args, "cpu", torch.float32), "aot_eager")
    cross_entropy_from_hidden(model(tokens, return_hidden=True), model.lm_head, tokens).backward()
    breaks = {reason: n for reason, n in counters["graph_break"].items()}
    return {"graph_breaks": sum(breaks.values()), "reasons": breaks, "graphs": counters["stats"]["unique_graphs"]}


def debug_args(kernels: str) -> ModelArgs:
    return ModelArgs.preset("debug", num_hidden_layers=4, first_k_dense_replace=1, kernels=kernels)


def slice_args() -> ModelArgs:
    return ModelArgs.preset("moonlight-16b-a3b", num_hidden_layers=4, first_k_dense_replace=1, kernels="triton")


def measure(fast: bool) -> dict:
    torch.manual_seed(0)
    out = {}
    for kernels in ("torch", "triton"):
        args = debug_args(kernels)
        tokens = torch.randint(0, args.vocab_size, (2, 64))
        out[f"debug fp32 {kernels}"] = step_counts(build(args, "cpu", torch.float32), tokens)
    for kernels in ("torch", "triton"):
        out[f"debug compiled {kernels}"] = graph_breaks(debug_args(kernels), torch.randint(0, 100, (2, 64)))
    if not fast:
        args = slice_args()
        tokens = torch.zeros(1, 4096, dtype=torch.long, device="meta")
        out["slice bf16 meta"] = step_counts(build(args, "meta", torch.bfloat16), tokens)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--fast", action="store_true", help="the debug model only")
    ap.add_argument("--check", action="store_true", help="exit 1 when a count exceeds its budget")
    a = ap.parse_args()
    result = measure(a.fast)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    over = [
        f"{name} {key}: {result[name][key]} > {budget}"
        for name, budgets in BUDGETS.items()
        if name in result
        for key, budget in budgets.items()
        if result[name][key] > budget
    ]
    over += [f"{name}: {r['graph_breaks']} graph breaks" for name, r in result.items() if r.get("graph_breaks")]
    print("\n".join(over) or "every count within its budget", file=sys.stderr)
    if a.check and over:
        sys.exit(1)


if __name__ == "__main__":
    main()
