"""Regional compilation: torch.compile each decoder block on its own, as torchtitan does.

Blocks repeat, so compiled graphs are shared between blocks of the same kind (dense or MoE) and compile
time stays that of two blocks. Only the block's forward is compiled: the module hooks of FSDP2 and of
the non-finite locator stay eager, and parameter names are unchanged, so checkpoints of compiled and
eager runs are interchangeable. Compile before activation checkpointing: "full" checkpointing then
recomputes the compiled forward (its context restoring the MoE load counters stays eager), and
"selective" checkpoints the attention inside the compiled graph. The grouped
expert GEMM and the Triton kernels are custom ops with fake implementations, so tracing treats
them as opaque.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile, in place, the forward of every decoder block of a model or pipeline stage."""
    for block in model.layers.values():
        block.forward = torch.compile(block.forward, backend=backend)
    return model
