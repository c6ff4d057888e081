"""Context parallel (CP) for MLA: every sequence split over the ``cp`` ranks of ``mesh["cp"]``.

    apply_context_parallel(model, cp_mesh)             # swaps MLA.key_exchange and MoE.sequence_split
    tokens = zigzag_slice(tokens, cp, cp_rank)         # positions stay the GLOBAL ones

Zig-zag split: S tokens in ``2 * cp`` chunks of ``L = S / (2 * cp)``; rank ``i`` holds chunks ``i``
and ``2 * cp - 1 - i``, so the causal work is even. Ranks all-gather MLA's normalized latent and
rotated rope key (576 values a token for Moonlight), not per-head keys and values, and each runs
``kv_b_proj`` on the keys its queries may see. Design: docs/parallelism.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moonlight.kernels.mla_rope import rotate_rope_
from moonlight.distributed import collective_result
from moonlight.model import MLA, DocumentMask, MoE
from moonlight.parallel.tensor import SequenceShards

__all__ = ["zigzag_slice", "zigzag_indices", "ContextParallelKeyExchange", "apply_context_parallel"]

# The differentiable all-gather: torch 2.13 renamed all_gather_tensor_autograd (2.11; deprecated since 2.13).
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def zigzag_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions (in order) of the tokens CP rank ``rank`` holds of a ``seq_len`` sequence."""
    chunk = seq_len // (2 * cp)
    return torch.cat(
        [
            torch.arange(rank * chunk, (rank + 1) * chunk),
            torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk),
        ]
    )


def zigzag_slice(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The chunks ``rank`` and ``2 * cp - 1 - rank`` of ``2 * cp`` equal chunks of ``x`` along ``dim``."""
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"a sequence of {x.shape[dim]} tokens does not split into 2 * cp = {2 * cp} chunks")
    chunk = x.shape[dim] // (2 * cp)
    return torch.cat([x.narrow(dim, rank * chunk, chunk), x.narrow(dim, (2 * cp - 1 - rank) * chunk, chunk)], dim=dim)


def _sequence_order(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """[cp * B, 2 * L, ...] (every rank's zig-zag slice, rank-major) -> [B, 2 * cp * L, ...] in order."""
    g = gathered.view(cp, -1, 2, gathered.shape[1] // 2, *gathered.shape[2:])
    chunks = torch.cat([g[:, :, 0], g[:, :, 1].flip(0)])  # [2 * cp, B, L, ...]: chunk c at index c
    return chunks.transpose(0, 1).flatten(1, 2)


class ContextParallelKeyExchange:
    """`moonlight.model.model.LocalKeyExchange` for a rank that holds the zig-zag slice ``rank`` of every
    sequence over ``group`` (``cp`` ranks). See the module docstring."""

    def __init__(self, group: dist.ProcessGroup, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank

    def _chunks(self) -> tuple[int, int]:
        """The global chunk indices of the local first and second half."""
        return self.rank, 2 * self.cp - 1 - self.rank

    def gather_keys(
        self, latent: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if cos.dim() != 3:
            raise ValueError(
                "context parallel needs each token's global RoPE position: pass positions "
                "(ParallelRun.shard_sequence makes them)"
            )
        # k_pe is rotated here, with its own tokens' angles, so the gathered rope keys need no angles of
        # the other ranks' tokens: the returned tables are the identity rotation
        k_pe = rotate_rope_(k_pe, cos, sin, k_pe.shape[-1], impl=impl)
        keys = torch.cat([latent, k_pe], dim=-1)  # one collective for both
        gathered = collective_result(_all_gather_autograd(keys, 0, self.group))
        chunk = keys.shape[1] // 2
        # the keys past the last local query are never attended to here
        keys = _sequence_order(gathered, self.cp)[:, : (self._chunks()[1] + 1) * chunk]
        latent, k_pe = keys.split([latent.shape[-1], k_pe.shape[-1]], dim=-1)
        identity = torch.ones(keys.shape[1], cos.shape[-1], dtype=cos.dtype, device=cos.device)
        return latent, k_pe, identity, torch.zeros_like(identity)

    def _causal_masks(self, chunk: int, device: torch.device) -> list[torch.Tensor]:
        """Per local query chunk at global chunk c: [L, (c + 1) * L] bool, query j sees keys <= c * L + j."""
        return [
            torch.ones(chunk, (c + 1) * chunk, dtype=torch.bool, device=device).tril(c * chunk) for c in self._chunks()
        ]

    def _document_masks(self, mask: DocumentMask, chunk: int) -> list[torch.Tensor]:
        """Per local query chunk: [B, 1, L, (c + 1) * L] bool, same document and causal. Built by the
        first layer of a forward (one all-gather of the ids), reused by the others."""
        key = ("context_parallel", self.cp, self.rank)
        if key not in mask.derived:
            local = mask.document_ids
            gathered = collective_result(funcol.all_gather_tensor(local.contiguous(), 0, self.group))
            ids = _sequence_order(gathered, self.cp)
            masks = []
            for half, (c, causal) in enumerate(zip(self._chunks(), self._causal_masks(chunk, local.device))):
                q_ids, k_ids = local[:, half * chunk : (half + 1) * chunk], ids[:, : (c + 1) * chunk]
                masks.append(((q_ids[:, :, None] == k_ids[:, None, :]) & causal).unsqueeze(1))
            mask.derived[key] = masks
        return mask.derived[key]

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: DocumentMask | None
    ) -> torch.Tensor:
        chunk = q.shape[1] // 2
        masks = self._document_masks(mask, chunk) if mask is not None else self._causal_masks(chunk, q.device)
        outs = []
        for half, (c, allowed) in enumerate(zip(self._chunks(), masks)):
            keys = (c + 1) * chunk
            out = F.scaled_dot_product_attention(
                q[:, half * chunk : (half + 1) * chunk].transpose(1, 2),
                k[:, :keys].transpose(1, 2),
                v[:, :keys].transpose(1, 2),
                attn_mask=allowed,
                scale=scale,
            )
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, dim=1)


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Give every MLA layer of a model (or pipeline stage) a `ContextParallelKeyExchange` over the 1-D
    ``cp_mesh``, and every MoE layer the `SequenceShards` of its sequences' cp slices. Parameters are
    untouched (data parallel reduces them over cp). Returns the model."""
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_context_parallel needs a 1-D cp mesh, got {cp_mesh.mesh_dim_names}")
    if cp_mesh.size() == 1:
        return model
    key_exchange = ContextParallelKeyExchange(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank())
    shards = SequenceShards(cp_mesh, loss_scale=cp_mesh.size())
    for module in model.modules():
        if isinstance(module, MLA):
            module.key_exchange = key_exchange
        elif isinstance(module, MoE):
            module.sequence_split = shards
    return model
