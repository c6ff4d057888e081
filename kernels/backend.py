"""Which implementation a kernel op runs: "torch" (the reference, runs anywhere) or "triton".

Each op in this folder takes impl="torch" or impl="triton"; on a CPU the Triton kernels run only under
TRITON_INTERPRET=1, set before the kernel modules are imported. The folder has no __init__.py on
purpose: it imports as `moonlight.kernels` (through the symlink moonlight/kernels), and a top-level
`kernels` package on sys.path would shadow PyPI's `kernels`, which transformers imports.
"""

import torch

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
            raise RuntimeError(
                "kernels='triton' needs the triton package (pip install triton); use kernels='torch' or 'auto' instead"
            )
        return "triton"
    raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")
