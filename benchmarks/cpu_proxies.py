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
import collections
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    InterpretedFunction = None

from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.model.loss import cross_entropy_from_hidden  # noqa: E402
from moonlight.model.model import MLA, LocalKeyExchange  # noqa: E402
from moonlight.parallel.compile import apply_compile  # noqa: E402

aten = torch.ops.aten
COPY_OPS = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.clone.default,
    aten._copy_from.default,
    aten._copy_from_and_resize.default,
    aten.lift_fresh_copy.default,
}
FILL_OPS = {
    aten.zero_.default,
    aten.fill_.Scalar,
    aten.fill_.Tensor,
    aten.zeros.default,
    aten.zeros_like.default,
    aten.new_zeros.default,
    aten.full.default,
    aten.new_full.default,
    aten.ones_like.default,
    aten.ones.default,
    aten.new_ones.default,
    aten.full_like.default,
}
# No kernel: allocation, metadata, views (tagged or aliasing their input)
FREE_OPS = {
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.empty_strided.default,
    aten.new_empty_strided.default,
    aten.detach.default,
    aten.lift_fresh.default,
    aten.set_.source_Storage,
    aten.resize_.default,
    aten.sym_size.int,
    aten.sym_stride.int,
    aten.sym_numel.default,
    aten.is_same_size.default,
    aten.sym_storage_offset.default,
    aten.promote_types.default,
    aten._unsafe_view.default,
}


def _is_view(func) -> bool:
    return func.is_view or torch.Tag.view_copy in func.tags or torch.Tag.inplace_view in func.tags


def _nbytes(out) -> int:
    return sum(
        t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
    )


class OpCounter(TorchDispatchMode):
    """Counts the non-view ops dispatched (launches), and the bytes written by copies and fills. Ops of
    the `moonlight` namespace (custom ops wrapping Triton kernels and `torch._grouped_mm`) count by what
    they run: the kernels (Triton's, under the interpreter) and the ops around them."""

    def __init__(self):
        super().__init__()
        self.launches = collections.Counter()
        self.copy_bytes = collections.Counter()
        self.copy_shapes = collections.Counter()
        self.fill_bytes = 0
        self.entered = 0
        self.muted = False  # inside a Triton kernel run by the interpreter: its host copies are no ops

    def __enter__(self):
        self.entered += 1
        if InterpretedFunction is not None and not hasattr(self, "_run"):
            self._run = InterpretedFunction.run
            counter = self

            def run(fn, *args, **kwargs):
                counter.launches["triton." + fn.__name__] += 1
                if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
                    return None  # shapes only: nothing to compute
                counter.muted, muted = True, counter.muted
                try:
                    return counter._run(fn, *args, **kwargs)
                finally:
                    counter.muted = muted

            InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        self.entered -= 1
        if hasattr(self, "_run") and not self.entered:
            InterpretedFunction.run = self._run
            del self._run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.muted:
            return func(*args, **kwargs)
        opdef = OPDEFS.get(func._name) if func.namespace == "moonlight" else None
        if opdef is not None:  # a wrapper: what its body runs counts (the kernel and the ops around it)
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if _is_view(func) or func in FREE_OPS:
            return out
        self.launches[str(func.overloadpacket)] += 1
        if func in COPY_OPS:
            self.copy_bytes[str(func.overloadpacket)] += _nbytes(out)
            src = args[1] if func is aten.copy_.default else args[0]
            self.copy_shapes[f"{func.overloadpacket} {src.dtype}->{out.dtype} {list(out.shape)}"] += 1
        elif func in FILL_OPS:
            self.fill_bytes += _nbytes(out)
        return out

    def summary(self, top: int = 12) -> dict:
        return {
            "launches": sum(self.launches.values()),
            "copy_bytes": sum(self.copy_bytes.values()),
            "fill_bytes": self.fill_bytes,
            "copies": dict(self.copy_bytes),
            "top_ops": dict(self.launches.most_common(top)),
            "top_copies": dict(self.copy_shapes.most_common(top)),
        }


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
    "slice bf16 meta": {"launches": 490, "copy_bytes": 5.7e9, "fill_bytes": 1.6e6},
    "debug fp32 torch": {"launches": 800, "copy_bytes": 4.05e5, "fill_bytes": 4.35e5},
    "debug fp32 triton": {"launches": 422, "copy_bytes": 2.7e5, "fill_bytes": 1.7e4},
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
