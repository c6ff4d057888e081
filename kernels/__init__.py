"""Triton kernels with PyTorch references: MoE token permute/unpermute, MLA RoPE (q rotated in place,
the key built with its rotated rope part in every head); the experts' grouped GEMM as an opaque op
for torch.compile.

Every op takes impl="torch" (the reference, runs anywhere) or impl="triton" (the kernels; on a
CPU they run only under TRITON_INTERPRET=1, set before this package is imported).
"""
import torch

from kernels.grouped_mm import grouped_mm
from kernels.mla_rope import mla_rope_key, rope_tables, rotate_pairs, rotate_rope_
from kernels.moe_permute import permute_tokens, unpermute_tokens

__all__ = ["grouped_mm", "mla_rope_key", "permute_tokens", "resolve_impl", "rope_tables", "rotate_pairs", "rotate_rope_",
           "unpermute_tokens"]


try:  # looked for once: the model resolves its impl in every layer's forward
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True


def resolve_impl(kernels: str, device) -> str:
    """Map a config's `kernels` setting ("auto" | "torch" | "triton") to the impl for `device`.

    "auto" picks Triton on CUDA when it is installed, else the torch reference.
    """
    if kernels == "auto":
        return "triton" if torch.device(device).type == "cuda" and HAS_TRITON else "torch"
    if kernels == "torch":
        return "torch"
    if kernels == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernels='triton' needs the triton package (pip install triton); "
                               "use kernels='torch' or 'auto' instead")
        return "triton"
    raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")
