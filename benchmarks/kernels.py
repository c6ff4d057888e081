"""Benchmark the kernels/ Triton kernels against their torch references and the plain torch ops a
peer would write (argsort + index_select / index_add, HF-style de-interleave + rotate-half).

    python benchmarks/kernels.py [--json PATH] [--cpu-smoke]   # --cpu-smoke: CPU measurement on tiny shapes

On CUDA: Moonlight shapes (MoE T=8192, H=2048, K=6, E=64; MLA RoPE S=4096, 16 heads of 128+64),
bf16, reporting ms, achieved GB/s (ideal bytes moved / time) and that as a fraction of the
bandwidth of a large device-to-device copy measured in the same run. The public ops' backward
is timed through autograd ("triton") beside the raw kernel op ("triton kernel"); the router's
forward + backward at 4096 tokens with the Triton tail against the torch reference. MLA RoPE is also
timed against the previous copying path (q's nope channels copied beside its rotated rope channels, the
rotated k_pe broadcast by a cat).

On CPU the Triton kernels only run in the interpreter, so their timings mean nothing: a small
correctness pass runs (the exit status is non-zero on a mismatch), then the torch path the model
takes on CPU, in-place RoPE with the fused key, is timed against the previous copying path at
Moonlight's attention shapes (forward + backward, alternating rounds, ratios per round) and the
bytes each allocates are counted.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton kernels are defined

from moonlight.kernels.mla_rope import mla_rope_key, rope_tables, rotate_pairs, rotate_rope_  # noqa: E402
from moonlight.kernels.moe_permute import permute_tokens, unpermute_tokens  # noqa: E402
from moonlight.kernels.moe_router import route_topk  # noqa: E402
from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model.model import Router  # noqa: E402

NUM_TOKENS, HIDDEN, TOP_K, NUM_EXPERTS = 8192, 2048, 6, 64
SEQ, HEADS, NOPE, ROPE, KV_LORA = 4096, 16, 128, 64, 512


# ---------------------------------------------------------------- what a peer would write


def peer_permute(x, expert_ids):
    order = expert_ids.flatten().argsort(stable=True)
    return x.index_select(0, order // expert_ids.shape[1]), order


def peer_unpermute(y, order, weights):
    token_of_row = order // weights.shape[1]
    scaled = y * weights.flatten()[order, None].to(y.dtype)
    return torch.zeros(weights.shape[0], y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, token_of_row, scaled)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def peer_rope(q, k_pe, cos, sin):
    """Hugging Face's interleaved variant: de-interleave, rotate-half (outputs in de-interleaved order)."""
    cos, sin = torch.cat((cos, cos), -1).to(q.dtype), torch.cat((sin, sin), -1).to(q.dtype)

    def rotate(x, cos, sin):
        x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return x * cos + _rotate_half(x) * sin

    q_nope, q_pe = q.split([q.shape[-1] - k_pe.shape[-1], k_pe.shape[-1]], dim=-1)
    return torch.cat((q_nope, rotate(q_pe, cos[:, None], sin[:, None])), -1), rotate(k_pe, cos, sin)


def peer_mla_rope(q_proj, k_nope, k_pe, cos, sin):
    """peer_rope on the per-head q, then the rotated k_pe broadcast over the heads beside k_nope."""
    q, k_rot = peer_rope(q_proj.unflatten(-1, (k_nope.shape[2], -1)), k_pe, cos, sin)
    return q, torch.cat([k_nope, k_rot.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)


# ---------------------------------------------------------------- MLA RoPE: the previous path and the fused one


def copying_mla_rope(q_proj, k_nope, k_pe, cos, sin):
    """The previous path (its torch reference): q [B, S, H*D] -> a new q of rotated rope channels beside
    a copy of the nope ones; the rotated k_pe broadcast over the heads by a cat with k_nope."""
    q = q_proj.unflatten(-1, (k_nope.shape[2], -1))
    nope = q.shape[-1] - k_pe.shape[-1]
    q = torch.cat((q[..., :nope], rotate_pairs(q[..., nope:], cos[:, None], sin[:, None]).to(q.dtype)), dim=-1)
    k_rot = rotate_pairs(k_pe, cos, sin).to(k_pe.dtype)
    return q, torch.cat([k_nope, k_rot.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)


def fused_mla_rope(q_proj, k_nope, k_pe, cos, sin, impl="torch"):
    """The model's path: q's rope channels rotated in place, the key built with rope(k_pe) in every head."""
    q = rotate_rope_(q_proj, cos, sin, NOPE + ROPE, impl=impl, grad_in_place=True)
    return q.unflatten(-1, (k_nope.shape[2], -1)), mla_rope_key(k_nope, k_pe, cos, sin, impl=impl)


def mla_rope_inputs(batch, seq, device, dtype):
    """The projection outputs RoPE reads, as the model slices them: q [B, S, H*(N+R)], k_nope a strided
    view of kv_b_proj's output, k_pe of kv_a_proj's. Leaves: q_proj is rotated in place, so each
    call starts from a fresh non-leaf copy (q_leaf * 1)."""
    q_leaf = torch.randn(batch, seq, HEADS * (NOPE + ROPE), dtype=dtype, device=device, requires_grad=True)
    kv_b = torch.randn(batch, seq, HEADS, NOPE + NOPE, dtype=dtype, device=device, requires_grad=True)
    kv_a = torch.randn(batch, seq, KV_LORA + ROPE, dtype=dtype, device=device, requires_grad=True)
    return q_leaf, kv_b, kv_a, kv_b[..., :NOPE], kv_a[..., KV_LORA:]


def mla_rope_ideal_bytes(batch, seq, element_size) -> dict:
    """Bytes each path must read and write, forward and backward, at HEADS heads of NOPE + ROPE."""
    q, q_rope = batch * seq * HEADS * (NOPE + ROPE), batch * seq * HEADS * ROPE
    k_nope, k, k_pe = batch * seq * HEADS * NOPE, batch * seq * HEADS * (NOPE + ROPE), batch * seq * ROPE
    fused_fwd = 2 * q_rope + k_nope + k + k_pe  # rope channels in place; k_nope in, k out, k_pe in
    fused_bwd = 2 * q_rope + q_rope + k_pe  # grad q's rope channels in place; k's rope tails in, grad k_pe out
    copying_fwd = 2 * q + 2 * k_pe + k_nope + k_pe + k  # q in/out, k_pe in/out, the cat
    copying_bwd = 2 * q + q_rope + k_pe + 2 * k_pe  # grad q in/out, the expand's head sum, k_pe's rotation
    return {
        name: n * element_size
        for name, n in (
            ("fused fwd", fused_fwd),
            ("fused bwd", fused_bwd),
            ("copying fwd", copying_fwd),
            ("copying bwd", copying_bwd),
        )
    }


# ---------------------------------------------------------------- CUDA timings


def _copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy: the practical peak the kernels are measured against."""
    from triton.testing import do_bench

    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


RESULTS: list[dict] = []  # every timed row, for --json


def _report(op: str, nbytes: int, candidates: dict, peak: float) -> None:
    from triton.testing import do_bench

    times = {name: do_bench(fn, return_mode="median") for name, fn in candidates.items()}
    for name, ms in times.items():
        gbs = nbytes / ms / 1e6
        print(f"{op:<24} {name:<14} {ms:8.3f} ms {gbs:8.0f} GB/s {gbs / peak:8.2f} {times['torch ref'] / ms:12.2f}x")
        RESULTS.append(
            {
                "op": op,
                "impl": name,
                "ms": ms,
                "gb_per_s": gbs,
                "of_copy_bandwidth": gbs / peak,
                "speedup_vs_torch_ref": times["torch ref"] / ms,
            }
        )


def router_step(x, kernels: str):
    """Forward + backward of Moonlight's router on x [T, H] (the aux loss's score gradient included)."""
    router = Router(ModelArgs.preset("moonlight-16b-a3b", kernels=kernels)).to(x.device)

    def step():
        weights, _, scores = router(x)
        torch.autograd.grad(weights.sum() + scores.sum(), (x, router.weight))

    return step


def benchmark_cuda() -> None:
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    peak = _copy_bandwidth()
    RESULTS.append({"op": "device-to-device copy", "gb_per_s": peak})
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {peak:.0f} GB/s\n")
    print(f"{'op':<24} {'impl':<14} {'time':>11} {'achieved':>13} {'of copy':>8} {'vs torch ref':>13}")

    x = torch.randn(NUM_TOKENS, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    expert_ids = torch.rand(NUM_TOKENS, NUM_EXPERTS, device=device).topk(TOP_K, dim=-1).indices
    weights = torch.rand(NUM_TOKENS, TOP_K, device=device, requires_grad=True)
    row_bytes = HIDDEN * x.element_size()
    for align in (1, 128):
        permuted, _, row_index = permute_tokens(x, expert_ids, NUM_EXPERTS, align, impl="torch")
        num_rows, slots = permuted.shape[0], NUM_TOKENS * TOP_K
        y = torch.randn_like(permuted, requires_grad=True)
        grad_permuted, grad_out = torch.randn_like(permuted), torch.randn_like(x)
        peer_permuted, order = peer_permute(x, expert_ids)
        peer_out = peer_unpermute(peer_permuted, order, weights)
        ref_out = unpermute_tokens(y, row_index, weights)
        # the public ops' backward as the model reaches it: autograd through the op (the raw kernel op beside)
        triton_permuted = permute_tokens(x, expert_ids, NUM_EXPERTS, align, impl="triton")[0]
        triton_out = unpermute_tokens(y, row_index, weights, impl="triton")
        tag = f" align={align}"
        _report(
            "permute fwd" + tag,
            (NUM_TOKENS + num_rows) * row_bytes,
            {
                "triton": lambda: permute_tokens(x, expert_ids, NUM_EXPERTS, align, impl="triton"),
                "triton kernel": lambda: torch.ops.moonlight.moe_permute(x, row_index, num_rows),
                "torch ref": lambda: permute_tokens(x, expert_ids, NUM_EXPERTS, align),
                "peer": lambda: peer_permute(x, expert_ids),
            },
            peak,
        )
        _report(
            "permute bwd" + tag,
            (slots + NUM_TOKENS) * row_bytes,
            {
                "triton": lambda: torch.autograd.grad(triton_permuted, x, grad_permuted, retain_graph=True),
                "triton kernel": lambda: torch.ops.moonlight.moe_permute_backward(grad_permuted, row_index, NUM_TOKENS),
                "torch ref": lambda: torch.autograd.grad(permuted, x, grad_permuted, retain_graph=True),
                "peer": lambda: torch.autograd.grad(peer_permuted, x, grad_permuted[:slots], retain_graph=True),
            },
            peak,
        )
        _report(
            "unpermute fwd" + tag,
            (slots + NUM_TOKENS) * row_bytes,
            {
                "triton": lambda: unpermute_tokens(y, row_index, weights, impl="triton"),
                "torch ref": lambda: unpermute_tokens(y, row_index, weights),
                "peer": lambda: peer_unpermute(y[:slots], order, weights),
            },
            peak,
        )
        _report(
            "unpermute bwd" + tag,
            (NUM_TOKENS + 2 * num_rows) * row_bytes,
            {
                "triton": lambda: torch.autograd.grad(triton_out, (y, weights), grad_out, retain_graph=True),
                "triton kernel": lambda: torch.ops.moonlight.moe_unpermute_backward(grad_out, y, row_index, weights),
                "torch ref": lambda: torch.autograd.grad(ref_out, (y, weights), grad_out, retain_graph=True),
                "peer": lambda: torch.autograd.grad(peer_out, (peer_permuted, weights), grad_out, retain_graph=True),
            },
            peak,
        )

    # the router at 4096 tokens: its fp32 GEMM, then the sigmoid top-k tail; bytes: x read twice, grad x written
    routed_x = torch.randn(4096, HIDDEN, dtype=dtype, device=device, requires_grad=True)
    _report(
        "router fwd+bwd T=4096",
        3 * routed_x.numel() * routed_x.element_size(),
        {"triton": router_step(routed_x, "triton"), "torch ref": router_step(routed_x, "torch")},
        peak,
    )

    cos, sin = rope_tables(SEQ, ROPE, 50000.0, device)
    for batch in (1, 4):
        q_leaf, kv_b, kv_a, k_nope, k_pe = mla_rope_inputs(batch, SEQ, device, dtype)
        q_proj = q_leaf.detach().clone()  # rotated in place over and over by the timed forwards
        ideal = mla_rope_ideal_bytes(batch, SEQ, q_leaf.element_size())
        leaves = (q_leaf, kv_b, kv_a)
        outs = {impl: fused_mla_rope(q_leaf * 1, k_nope, k_pe, cos, sin, impl) for impl in ("torch", "triton")}
        copying_outs = copying_mla_rope(q_leaf * 1, k_nope, k_pe, cos, sin)
        peer_outs = peer_mla_rope(q_leaf, k_nope, k_pe, cos, sin)
        grads = tuple(torch.randn_like(t) for t in outs["torch"])
        tag = f" B={batch}"
        with torch.no_grad():
            _report(
                "mla rope fwd" + tag,
                ideal["fused fwd"],
                {
                    "triton": lambda: fused_mla_rope(q_proj, k_nope, k_pe, cos, sin, "triton"),
                    "torch ref": lambda: fused_mla_rope(q_proj, k_nope, k_pe, cos, sin),
                    "copying": lambda: copying_mla_rope(q_proj, k_nope, k_pe, cos, sin),
                    "peer": lambda: peer_mla_rope(q_proj, k_nope, k_pe, cos, sin),
                },
                peak,
            )
        _report(
            "mla rope bwd" + tag,
            ideal["fused bwd"],
            {
                "triton": lambda: torch.autograd.grad(outs["triton"], leaves, grads, retain_graph=True),
                "torch ref": lambda: torch.autograd.grad(outs["torch"], leaves, grads, retain_graph=True),
                "copying": lambda: torch.autograd.grad(copying_outs, leaves, grads, retain_graph=True),
                "peer": lambda: torch.autograd.grad(peer_outs, leaves, grads, retain_graph=True),
            },
            peak,
        )
        RESULTS.append({"op": "mla rope ideal bytes" + tag, **ideal})


# ---------------------------------------------------------------- CPU: the model's RoPE path vs the previous one


def _allocated_bytes(fn) -> int:
    """Bytes the CPU allocator hands out while fn runs (each op's own allocations, from the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.name != "[memory]" and e.self_cpu_memory_usage > 0)


def measure_cpu_rope(batch: int = 1, seq: int = 1024, rounds: int = 9, repeats: int = 3) -> dict:
    """Forward + backward of the fused in-place path the model takes on CPU (impl="torch") and of the
    previous copying path, fp32, Moonlight's heads; rounds alternate the two. Returns the per-round
    time ratios (copying / fused) and the bytes each allocates (its outputs, gradients and temporaries;
    the leaves' gradients, allocated by both, left out)."""
    torch.manual_seed(0)
    cos, sin = rope_tables(seq, ROPE, 50000.0)
    q_leaf, kv_b, kv_a, k_nope, k_pe = mla_rope_inputs(batch, seq, torch.device("cpu"), torch.float32)
    grads = (torch.randn(batch, seq, HEADS, NOPE + ROPE), torch.randn(batch, seq, HEADS, NOPE + ROPE))
    paths = {"fused": fused_mla_rope, "copying": copying_mla_rope}

    def step(path):
        q_proj = q_leaf * 1  # as the projection hands it over (outside the timed part)
        grad_q = grads[0].clone()  # the fused backward rotates it in place
        start = time.perf_counter()
        outs = paths[path](q_proj, k_nope, k_pe, cos, sin)
        torch.autograd.grad(outs, (q_leaf, kv_b, kv_a), (grad_q, grads[1]))
        return time.perf_counter() - start

    for path in paths:
        step(path)  # warm-up
    ratios = []
    for _ in range(rounds):
        times = {path: min(step(path) for _ in range(repeats)) for path in paths}
        ratios.append(times["copying"] / times["fused"])
    # not the paths' own: the step's copies of q and grad q, and the three leaves' gradients
    common = sum(t.numel() * t.element_size() for t in (q_leaf, q_leaf, q_leaf, kv_b, kv_a))
    allocated = {path: _allocated_bytes(lambda: step(path)) - common for path in paths}
    ideal = mla_rope_ideal_bytes(batch, seq, q_leaf.element_size())
    result = {
        "shape": f"B={batch} S={seq} heads={HEADS} nope={NOPE} rope={ROPE} fp32",
        "time_copying_over_fused_median": statistics.median(ratios),
        "time_copying_over_fused_min_max": [min(ratios), max(ratios)],
        "allocated_bytes": allocated,
        "allocated_copying_over_fused": allocated["copying"] / allocated["fused"],
        "ideal_bytes": ideal,
        "ideal_copying_over_fused": (
            (ideal["copying fwd"] + ideal["copying bwd"]) / (ideal["fused fwd"] + ideal["fused bwd"])
        ),
    }
    print(
        f"MLA RoPE fwd+bwd on CPU ({result['shape']}), {rounds} alternating rounds:\n"
        f"  time copying / fused: median {result['time_copying_over_fused_median']:.2f}x "
        f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)\n"
        f"  bytes allocated: fused {allocated['fused'] / 2**20:.1f} MiB, "
        f"copying {allocated['copying'] / 2**20:.1f} MiB "
        f"({result['allocated_copying_over_fused']:.2f}x)\n"
        f"  ideal bytes moved: copying / fused {result['ideal_copying_over_fused']:.2f}x"
    )
    return result


# ---------------------------------------------------------------- CPU correctness pass


def check_cpu() -> bool:
    torch.manual_seed(0)
    ok = True

    def check(name, got, want):
        nonlocal ok
        close = torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        ok &= close
        print(f"  {name:<40} {'ok' if close else 'MISMATCH'}")

    num_tokens, hidden, top_k, num_experts = 16, 40, 3, 8
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    expert_ids = torch.rand(num_tokens, num_experts - 2).topk(top_k, dim=-1).indices  # two idle experts
    weights = torch.rand(num_tokens, top_k, requires_grad=True)
    for align in (1, 8):
        results = {}
        for impl in ("torch", "triton"):
            permuted, group_sizes, row_index = permute_tokens(x, expert_ids, num_experts, align, impl=impl)
            y = permuted * 2 + 1
            out = unpermute_tokens(y, row_index, weights, impl=impl)
            results[impl] = (permuted, out, *torch.autograd.grad(out.square().sum(), (x, weights)))
        for name, got, want in zip(("permuted", "out", "grad x", "grad weights"), results["triton"], results["torch"]):
            check(f"moe align={align} {name}", got, want)

    logits = torch.randn(num_tokens, num_experts, requires_grad=True)
    bias = torch.rand(num_experts) * 0.1
    results = {}
    for impl in ("torch", "triton"):
        routed, ids, scores = route_topk(logits, bias, top_k, 2.446, impl=impl)
        order = ids.argsort(-1)  # the choices in expert order (top-k's own order is unspecified)
        results[impl] = (
            ids.gather(1, order).float(),
            routed.gather(1, order),
            *torch.autograd.grad(routed.square().sum() + scores.sum(), logits),
        )
    for name, got, want in zip(("expert ids", "weights", "grad logits"), results["triton"], results["torch"]):
        check(f"router {name}", got, want)

    cos, sin = rope_tables(5, ROPE, 50000.0)
    q_leaf, kv_b, kv_a, k_nope, k_pe = mla_rope_inputs(2, 5, torch.device("cpu"), torch.float32)
    results = {}
    for impl in ("torch", "triton"):
        q, k = fused_mla_rope(q_leaf * 1, k_nope, k_pe, cos, sin, impl)
        results[impl] = (q, k, *torch.autograd.grad(q.square().sum() + k.square().sum(), (q_leaf, kv_b, kv_a)))
    copying = copying_mla_rope(q_leaf * 1, k_nope, k_pe, cos, sin)
    for name, got, want in zip(("q", "k", "grad q", "grad kv_b", "grad kv_a"), results["triton"], results["torch"]):
        check(f"mla rope {name}", got, want)
    for name, got, want in zip(("q", "k"), results["torch"], copying):
        check(f"mla rope {name} vs the copying path", got, want)
    return ok


if __name__ == "__main__":
    # --json PATH: also write the rows (or the CPU pass's verdict and measurement) as JSON, for gpu_suite.sh
    json_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    if torch.cuda.is_available():
        benchmark_cuda()
        ok = True
    else:
        print(
            "No CUDA device: Triton runs in the interpreter here, so its timings are not meaningful.\n"
            "Running a small correctness pass (Triton vs torch reference, fp32) instead."
        )
        ok = check_cpu()
        RESULTS.append({"cpu_correctness_pass": ok})
        smoke = "--cpu-smoke" in sys.argv  # gpu_suite.sh --cpu-smoke: the measurement on tiny shapes
        RESULTS.append(
            {"op": "mla rope cpu", **(measure_cpu_rope(seq=16, rounds=1, repeats=1) if smoke else measure_cpu_rope())}
        )
    if json_path:
        import json

        Path(json_path).write_text(json.dumps(RESULTS, indent=1))
    sys.exit(0 if ok else 1)
