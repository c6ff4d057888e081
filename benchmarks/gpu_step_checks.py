"""GPU measurements of the training step's pieces (host syncs, SDPA, MoE, activation checkpointing).

One JSON record per line as each finishes (a timeout still leaves numbers), then one JSON object with
every result.

    python benchmarks/gpu_step_checks.py             # on a GPU: Moonlight's shapes, bf16
    python benchmarks/gpu_step_checks.py --cpu-smoke # tiny shapes on CPU, fp32 (checks the script)

- syncs_per_microbatch: host syncs of one forward + backward of a small Moonlight (counted by
  instrumenting `.item()`/`bool()`/`.tolist()`/size-reading ops; on CUDA also the sync debug mode).
- sdpa: backend and forward + backward time of attention with qk 192 / v 192 (v padded) against
  qk 192 / v 128, every backend pinned in turn on CUDA (a backend that refuses the shape is "n/a").
- moe_breakdown: forward + backward time of each piece of one MoE layer: router, permute,
  grouped experts, unpermute, shared experts, and the whole layer.
- ac_step: step time and peak memory of a small model by activation checkpoint mode and
  micro-batch size.
Times are the best of a few repeats after a warm-up; compare them within one run only.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])
from moonlight.kernels.backend import resolve_impl  # noqa: E402
from moonlight.kernels.moe_permute import permute_tokens, unpermute_tokens  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.model.loss import cross_entropy_from_hidden  # noqa: E402
from moonlight.model.model import MoE, grouped_swiglu  # noqa: E402
from moonlight.parallel.data_parallel import AC_MODES, apply_activation_checkpointing  # noqa: E402
from tests.helpers import host_syncs  # noqa: E402

RESULTS: dict = {}


def report(key: str, value) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


def timed(fn, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up, device work included."""
    cuda = torch.cuda.is_available()
    best = float("inf")
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def small_model_args(smoke: bool, layers: int = 2) -> ModelArgs:
    """Moonlight's layer shapes with few layers (a smaller vocab keeps the head from dominating)."""
    if smoke:
        return dataclasses.replace(ModelArgs.preset("debug"), num_hidden_layers=layers)
    return dataclasses.replace(ModelArgs.preset("moonlight-16b-a3b"), num_hidden_layers=layers, vocab_size=32768)


def _initialized(args: ModelArgs, device, dtype) -> Moonlight:
    """A seeded model with its weights initialized (router and expert weights start uninitialized)."""
    torch.manual_seed(0)
    model = Moonlight(args)
    model.init_weights()
    return model.to(device=device, dtype=dtype)


def syncs_per_microbatch(args: ModelArgs, device, dtype, seq: int) -> dict:
    model = _initialized(args, device, dtype)
    tokens = torch.randint(0, args.vocab_size, (1, seq), device=device)

    def step():
        cross_entropy_from_hidden(model(tokens, return_hidden=True), model.lm_head, tokens).backward()

    step()  # warm-up (caches, lazy init)
    found = host_syncs(step)
    out = {"count": len(found), "ops": sorted(set(found)), "moe_layers": len(model.moe_layers())}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(0)
        out["cuda_sync_debug_warnings"] = len(caught)
    return out


def sdpa_widths(device, dtype, heads: int, seq: int, repeats: int) -> dict:
    """qk 192 with v 192 (padded) and v 128, per backend on CUDA (the default choice on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, 192, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, heads, seq, 192, device=device, dtype=dtype, generator=g)
    backends = (
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        if device.type == "cuda"
        else [None]
    )
    out = {}
    for v_width in (192, 128):
        v = torch.randn(1, heads, seq, v_width, device=device, dtype=dtype, generator=g)
        if v_width == 192:  # the padded call: 128 true channels + 64 zeros
            v[..., 128:] = 0
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))

        def run():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).sum().backward()

        for backend in backends:
            name = backend.name if backend is not None else "default"
            try:
                if backend is None:
                    seconds = timed(run, repeats)
                else:
                    with sdpa_kernel([backend]):
                        seconds = timed(run, repeats)
                out[f"qk192_v{v_width}/{name}"] = round(seconds * 1e3, 3)
            except RuntimeError:
                out[f"qk192_v{v_width}/{name}"] = "n/a"
        if device.type == "cuda":  # the backend SDPA picks by itself, by its kernel name in the profiler
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            kernels = [
                e.key
                for e in prof.key_averages()
                if "attention" in e.key.lower()
                or "fmha" in e.key.lower()
                or "flash" in e.key.lower()
                or "cudnn" in e.key.lower()
            ]
            out[f"qk192_v{v_width}/chosen_kernels"] = kernels[:4]
    out["unit"] = "ms forward+backward"
    return out


def moe_breakdown(args: ModelArgs, device, dtype, tokens: int, repeats: int) -> dict:
    """Forward + backward time of each piece of one MoE layer at `tokens` tokens."""
    torch.manual_seed(0)
    moe = MoE(args).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    moe.router.expert_bias = moe.router.expert_bias.float()
    impl = resolve_impl(args.kernels, torch.device(device))
    x = torch.randn(tokens, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
    weights, expert_ids, _ = moe.router(x)
    weights = weights.to(dtype).detach().requires_grad_()
    experts = moe.experts
    rows, counts, state = permute_tokens(x.detach(), expert_ids, args.n_routed_experts, impl=impl)
    rows = rows.detach().requires_grad_()
    y = grouped_swiglu(rows, counts, experts.gate_proj, experts.up_proj, experts.down_proj).detach().requires_grad_()

    def backward(t):
        t.float().sum().backward()

    pieces = {
        "router": lambda: backward(moe.router(x)[0]),
        "permute": lambda: backward(permute_tokens(x, expert_ids, args.n_routed_experts, impl=impl)[0]),
        "experts": lambda: backward(
            grouped_swiglu(rows, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
        ),
        "unpermute": lambda: backward(unpermute_tokens(y, state, weights, impl=impl)),
        "shared": lambda: backward(moe.shared_experts(x)),
        "whole_layer": lambda: backward(moe(x)),
    }
    out = {name: round(timed(fn, repeats) * 1e3, 3) for name, fn in pieces.items()}
    out["unit"] = f"ms forward+backward, {tokens} tokens"
    return out


def ac_steps(args: ModelArgs, device, dtype, seq: int, batches: list[int], repeats: int) -> dict:
    """Step time and peak memory (CUDA) by activation checkpoint mode and micro-batch size."""
    out = {}
    for mode in AC_MODES:
        model = apply_activation_checkpointing(_initialized(args, device, dtype), mode)
        for batch in batches:
            tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)

            def step():
                model.zero_grad(set_to_none=True)
                cross_entropy_from_hidden(model(tokens, return_hidden=True), model.lm_head, tokens).backward()

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = timed(step, repeats)
            except torch.OutOfMemoryError:
                out[f"{mode}/mbs{batch}"] = "oom"
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            out[f"{mode}/mbs{batch}"] = {
                "step_s": round(seconds, 4),
                "peak_gib": peak and round(peak, 2),
                "tokens_per_s": round(batch * seq / seconds),
            }
        model = None  # freed before the next mode's model is built
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, fp32")
    opts = parser.parse_args()
    smoke = opts.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu") if smoke else torch.device("cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    repeats = 1 if smoke else 5
    report("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    args = small_model_args(smoke)
    report("syncs_per_microbatch", syncs_per_microbatch(args, device, dtype, seq=16 if smoke else 4096))
    report("sdpa", sdpa_widths(device, dtype, heads=2 if smoke else 16, seq=32 if smoke else 4096, repeats=repeats))
    report("moe_breakdown", moe_breakdown(args, device, dtype, tokens=64 if smoke else 4096, repeats=repeats))
    report(
        "ac_step",
        ac_steps(
            args, device, dtype, seq=16 if smoke else 4096, batches=[1, 2] if smoke else [1, 2, 4], repeats=repeats
        ),
    )
    print(json.dumps(RESULTS), flush=True)


if __name__ == "__main__":
    main()
