"""Load a Hugging Face checkpoint into an already parallelized model, each rank reading only its shards.

For every parameter and persistent buffer the model (or pipeline stage) holds, the rank computes
the global region its local shard covers (TP Shard(0)/Shard(1), FSDP Shard(0) incl. the strided
FSDP-over-TP case, EP Shard(0) on stacked experts) with
`torch.distributed.tensor._utils.compute_local_shape_and_global_offset`, and reads just that region
with safetensors' lazy `get_slice`. Stacked experts read only the experts in the local region (one
HF key per expert) and, of each, only the local rows/columns. Buffers (the router's
``expert_bias``) are plain tensors and are read whole. Keys of layers a pipeline stage does not
hold are never touched.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moonlight.config import SHAPE_FIELDS
from moonlight.errors import CheckpointError
from moonlight.hf import HFCheckpoint, hf_keys, is_expert_stack
from moonlight.model import MoE


def local_region(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, local shape, global offset) of a parameter or buffer; whole for plain tensors."""
    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        local = tensor.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(
                f"local shard shape {tuple(local.shape)} != computed {tuple(shape)} for placements {tensor.placements}"
            )
        return local, tuple(shape), tuple(offset)
    return tensor, tuple(tensor.shape), (0,) * tensor.ndim


@torch.no_grad()
def load_hf_sharded(
    model: nn.Module, path: str | os.PathLike | None = None, *, checkpoint: HFCheckpoint | None = None
) -> dict[str, int]:
    """Fill ``model``'s (materialized, e.g. after ``to_empty``) local shards from a HF checkpoint.

    ``model``: a parallelized Moonlight or pipeline stage; its ``args`` must match the checkpoint's
    shapes. Pass ``path`` (a HF safetensors directory) or an open ``checkpoint``. Values are cast to
    each parameter's dtype. MoE load counters are zeroed. Returns ``{"tensors": n, "bytes_read": b}``
    (b counts bytes of the checkpoint's dtype this rank read). Checks the checkpoint as `load_hf`
    does, and every value read is finite.
    """
    if checkpoint is None:
        if path is None:
            raise ValueError("pass the checkpoint directory (path) or an HFCheckpoint")
        checkpoint = HFCheckpoint(path)
    args = model.args
    mismatched = [
        f"{f}: model {getattr(args, f)!r} vs checkpoint {getattr(checkpoint.args, f)!r}"
        for f in SHAPE_FIELDS
        if getattr(args, f) != getattr(checkpoint.args, f)
    ]
    if mismatched:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not match the model: " + "; ".join(mismatched))
    checkpoint.check(args)  # what load_hf and the converter check: keys, layer count, dtypes (not FP8)

    persistent = set(model.state_dict().keys())
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n in persistent)
    stats = {"tensors": 0, "bytes_read": 0}
    for name, tensor in tensors.items():
        if tensor.is_meta or (isinstance(tensor, DTensor) and tensor.to_local().is_meta):
            raise RuntimeError(f"{name} is on the meta device: call model.to_empty(device=...) before loading")
        keys = hf_keys(name, args)
        local, shape, offset = local_region(tensor)
        if is_expert_stack(name):
            checkpoint.check_shape(keys[0], tensor.shape[1:])  # the experts' keys share one shape
            for i in range(shape[0] if local.numel() else 0):
                key = keys[offset[0] + i]
                region = tuple(slice(o, o + s) for o, s in zip(offset[1:], shape[1:]))
                part = checkpoint.read(key, region)
                local[i].copy_(part)
                stats["bytes_read"] += part.numel() * part.element_size()
        else:
            key = keys[0]
            checkpoint.check_shape(key, tensor.shape)
            if local.numel() == 0:
                continue
            part = checkpoint.read(key, tuple(slice(o, o + s) for o, s in zip(offset, shape)))
            local.copy_(part)
            stats["bytes_read"] += part.numel() * part.element_size()
        stats["tensors"] += 1
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    return stats
