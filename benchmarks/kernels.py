"""Benchmark the kernels/ Triton kernels against their torch references and the plain torch ops a
peer would write (argsort + index_select / index_add, HF-style de-interleave + rotate-half).

    python benchmarks/kernels.py

On CUDA: Moonlight shapes (MoE T=8192, H=2048, K=6, E=64; MLA RoPE S=4096, 16 heads of 128+64),
bf16, reporting ms, achieved GB/s (ideal bytes moved / time) and that as a fraction of the
bandwidth of a large device-to-device copy measured in the same run. On CPU the Triton kernels
only run in the interpreter, so timings mean nothing: a small correctness pass runs instead and
the exit status is non-zero on a mismatch.
"""
import os
import sys
from pathlib import Path

import torch

# this file is itself named kernels.py: put the repository root first so `import kernels` is the package
sys.path[0] = str(Path(__file__).resolve().parents[1])
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton kernels are defined

from kernels import apply_mla_rope, permute_tokens, rope_tables, unpermute_tokens  # noqa: E402

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
        RESULTS.append({"op": op, "impl": name, "ms": ms, "gb_per_s": gbs, "of_copy_bandwidth": gbs / peak,
                        "speedup_vs_torch_ref": times["torch ref"] / ms})


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
        tag = f" align={align}"
        _report("permute fwd" + tag, (NUM_TOKENS + num_rows) * row_bytes, {
            "triton": lambda: permute_tokens(x, expert_ids, NUM_EXPERTS, align, impl="triton"),
            "triton kernel": lambda: torch.ops.moonlight.moe_permute(x, row_index, num_rows),
            "torch ref": lambda: permute_tokens(x, expert_ids, NUM_EXPERTS, align),
            "peer": lambda: peer_permute(x, expert_ids),
        }, peak)
        _report("permute bwd" + tag, (slots + NUM_TOKENS) * row_bytes, {
            "triton": lambda: torch.ops.moonlight.moe_permute_backward(grad_permuted, row_index, NUM_TOKENS),
            "torch ref": lambda: torch.autograd.grad(permuted, x, grad_permuted, retain_graph=True),
            "peer": lambda: torch.autograd.grad(peer_permuted, x, grad_permuted[:slots], retain_graph=True),
        }, peak)
        _report("unpermute fwd" + tag, (slots + NUM_TOKENS) * row_bytes, {
            "triton": lambda: unpermute_tokens(y, row_index, weights, impl="triton"),
            "torch ref": lambda: unpermute_tokens(y, row_index, weights),
            "peer": lambda: peer_unpermute(y[:slots], order, weights),
        }, peak)
        _report("unpermute bwd" + tag, (NUM_TOKENS + 2 * num_rows) * row_bytes, {
            "triton": lambda: torch.ops.moonlight.moe_unpermute_backward(grad_out, y, row_index, weights),
            "torch ref": lambda: torch.autograd.grad(ref_out, (y, weights), grad_out, retain_graph=True),
            "peer": lambda: torch.autograd.grad(peer_out, (peer_permuted, weights), grad_out, retain_graph=True),
        }, peak)

    cos, sin = rope_tables(SEQ, ROPE, 50000.0, device)
    for batch in (1, 4):
        q = torch.randn(batch, SEQ, HEADS, NOPE + ROPE, dtype=dtype, device=device, requires_grad=True)
        kv = torch.randn(batch, SEQ, KV_LORA + ROPE, dtype=dtype, device=device, requires_grad=True)
        k_pe = kv[..., KV_LORA:]  # a strided view, as the model slices it from kv_a_proj's output
        nbytes = 2 * (q.numel() + k_pe.numel()) * q.element_size()
        outs = {impl: apply_mla_rope(q, k_pe, cos, sin, impl=impl) for impl in ("torch", "triton")}
        peer_outs = peer_rope(q, k_pe, cos, sin)
        grads = tuple(torch.randn_like(t) for t in outs["torch"])
        tag = f" B={batch}"
        _report("rope fwd" + tag, nbytes, {
            "triton": lambda: apply_mla_rope(q, k_pe, cos, sin, impl="triton"),
            "torch ref": lambda: apply_mla_rope(q, k_pe, cos, sin),
            "peer": lambda: peer_rope(q, k_pe, cos, sin),
        }, peak)
        _report("rope bwd" + tag, nbytes, {
            "triton": lambda: torch.autograd.grad(outs["triton"], (q, kv), grads, retain_graph=True),
            "torch ref": lambda: torch.autograd.grad(outs["torch"], (q, kv), grads, retain_graph=True),
            "peer": lambda: torch.autograd.grad(peer_outs, (q, kv), grads, retain_graph=True),
        }, peak)


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

    q = torch.randn(2, 5, 3, 12, requires_grad=True)
    kv = torch.randn(2, 5, 10, requires_grad=True)
    cos, sin = rope_tables(5, 6, 50000.0)
    results = {}
    for impl in ("torch", "triton"):
        q_out, k_out = apply_mla_rope(q, kv[..., 4:], cos, sin, impl=impl)
        results[impl] = (q_out, k_out, *torch.autograd.grad(q_out.square().sum() + k_out.square().sum(), (q, kv)))
    for name, got, want in zip(("q", "k_pe", "grad q", "grad kv"), results["triton"], results["torch"]):
        check(f"mla rope {name}", got, want)
    return ok


if __name__ == "__main__":
    # --json PATH: also write the rows (or the CPU pass's verdict) as JSON, for benchmarks/gpu_suite.sh
    json_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    if torch.cuda.is_available():
        benchmark_cuda()
        ok = True
    else:
        print("No CUDA device: Triton runs in the interpreter here, so timings are not meaningful.\n"
              "Running a small correctness pass (Triton vs torch reference, fp32) instead.")
        ok = check_cpu()
        RESULTS.append({"cpu_correctness_pass": ok})
    if json_path:
        import json

        Path(json_path).write_text(json.dumps(RESULTS, indent=1))
    sys.exit(0 if ok else 1)
