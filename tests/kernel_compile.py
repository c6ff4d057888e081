"""Compile every Triton kernel for NVIDIA GPUs with real Triton and ptxas, ahead of time, on a machine
without one: `python -m tests.kernel_compile` (run by tests/single/test_kernel_compile.py).

The public ops run at Moonlight's shapes, forward and backward, in bf16 and fp32, with every kernel
launch recorded instead of executed; each distinct launch (argument types and compile-time
constants) is then compiled through Triton's NVIDIA backend down to a cubin for each target. Prints
one JSON line: the kernels launched and, per target, the number of distinct launches compiled.

Run it without TRITON_INTERPRET: the interpreter patches `triton.language` for the whole process,
after which the compiler cannot lower a kernel.
"""

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import moonlight.kernels.mla_rope
import moonlight.kernels.moe_permute
import moonlight.kernels.moe_router
import moonlight.kernels.rms_norm
from moonlight.kernels.mla_rope import mla_rope_key, rope_tables, rotate_rope_
from moonlight.kernels.moe_permute import permute_tokens, unpermute_tokens
from moonlight.kernels.moe_router import route_topk
from moonlight.kernels.rms_norm import rms_norm
from moonlight.config import ModelArgs

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}  # A100; H100/H200
TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel: JITFunction, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches() -> list:
    """Swap every Triton kernel of the kernel modules for a LaunchRecorder; returns the launch list."""
    launches = []
    for module in (
        moonlight.kernels.mla_rope,
        moonlight.kernels.moe_permute,
        moonlight.kernels.moe_router,
        moonlight.kernels.rms_norm,
    ):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, name, LaunchRecorder(value, launches))
    return launches


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    missing = set(kernel.arg_names) - values.keys()
    if missing:
        raise TypeError(f"{kernel.__name__} launched without {sorted(missing)}")
    signature, constants = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[(i,)] = values[param.name]
        else:
            signature[param.name] = argument_type(values[param.name])
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    return triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target, options=options
    )


def run_every_op(dtype: torch.dtype) -> None:
    """Forward and backward of each op through its Triton path at Moonlight's widths (2 x 8 tokens)."""
    a = ModelArgs.preset("moonlight-16b-a3b")
    batch, seq, heads = 2, 8, a.num_attention_heads
    cos, sin = rope_tables(seq, a.qk_rope_head_dim, a.rope_theta)
    positions = torch.arange(seq).expand(batch, seq)
    for tables in ((cos, sin), (cos[positions], sin[positions])):  # shared and per-token angles
        q = torch.zeros(batch, seq, heads * a.qk_head_dim, dtype=dtype, requires_grad=True)
        rotate_rope_(q.clone(), *tables, a.qk_head_dim, impl="triton", grad_in_place=True).sum().backward()
        k_nope = torch.zeros(batch, seq, heads, a.qk_nope_head_dim, dtype=dtype, requires_grad=True)
        k_pe = torch.zeros(batch, seq, a.qk_rope_head_dim, dtype=dtype, requires_grad=True)
        mla_rope_key(k_nope, k_pe, *tables, impl="triton").sum().backward()
    tokens = batch * seq
    expert_ids = torch.arange(tokens * a.num_experts_per_tok).view(tokens, -1) % a.n_routed_experts
    x = torch.zeros(tokens, a.hidden_size, dtype=dtype, requires_grad=True)
    weights = torch.ones(tokens, a.num_experts_per_tok, requires_grad=True)
    for align in (1, 8):  # unpadded groups, and groups padded for the grouped GEMM
        permuted, _, row_index = permute_tokens(x, expert_ids, a.n_routed_experts, align=align, impl="triton")
        unpermute_tokens(permuted, row_index, weights, impl="triton").sum().backward()
    logits = torch.zeros(tokens, a.n_routed_experts, requires_grad=True)  # the router runs in fp32
    bias = torch.zeros(a.n_routed_experts)
    for with_scores in (True, False):  # the aux loss differentiates the scores too
        routed, _, scores = route_topk(logits, bias, a.num_experts_per_tok, a.routed_scaling_factor, impl="triton")
        (routed.sum() + scores.sum() if with_scores else routed.sum()).backward()
    for width in (a.hidden_size, a.kv_lora_rank):  # the block norms and kv_norm, on its strided latent
        x = torch.zeros(tokens, width + a.qk_rope_head_dim, dtype=dtype, requires_grad=True)
        weight = torch.ones(width, dtype=dtype, requires_grad=True)
        rms_norm(x[:, :width], weight, a.rms_norm_eps, impl="triton").sum().backward()


def main() -> None:
    launches = record_launches()
    for dtype in (torch.bfloat16, torch.float32):
        run_every_op(dtype)
    distinct = {}
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, tuple(argument_type(v) for v in args), repr(sorted(kwargs.items())))
        distinct.setdefault(key, (kernel, args, kwargs))
    compiled = {}
    for name, target in TARGETS.items():
        for key, (kernel, args, kwargs) in distinct.items():
            binary = compile_launch(kernel, args, kwargs, target)
            # lowered through TTIR, TTGIR, LLVM IR and PTX for this architecture, then by ptxas to a cubin
            if not binary.asm["cubin"] or f".target {name}" not in binary.asm["ptx"]:
                raise RuntimeError(f"{key} did not compile to a {name} cubin")
            compiled[name] = compiled.get(name, 0) + 1
    print(json.dumps({"kernels": sorted({key[0] for key in distinct}), "compiled": compiled}))


if __name__ == "__main__":
    sys.exit(main())
