"""Expert parallel (EP): routed experts sharded over an EP mesh, tokens moved by all-to-all.

    apply_expert_parallel(model, ep_mesh)

shards each MoE layer's stacked expert weights ([E, ...]) as Shard(0) over ``ep_mesh`` and swaps
``experts.dispatcher`` for an `AllToAllDispatcher` (the interface of model.LocalDispatcher).
Notation: T tokens, K choices per token, H hidden, E experts (E_local per rank), N routed rows.

    dispatch(x [T, H], expert_ids [T, K], counts [E]) -> (rows [N, H] by local expert, counts [E_local], state)
    combine(y [N, H], weights [T, K], state) -> out [T, H]

Data flow, the one host sync and the gradient rules for data parallel: docs/moe.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moonlight.kernels.moe_permute import permute_tokens, unpermute_tokens
from moonlight.distributed import collective_result
from moonlight.model import GroupedExperts

__all__ = ["AllToAllDispatcher", "apply_expert_parallel"]

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _read_on_host(t: torch.Tensor) -> list[int]:
    """t's values on the host. On CUDA: one non-blocking copy into pinned memory, waited on an event,
    so the host waits for this copy only (a plain .tolist() copies through pageable memory)."""
    if not t.is_cuda:
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))
    copied.synchronize()
    return host.tolist()


@dataclass
class _A2AState:
    row_index: torch.Tensor  # [T*K] (token, choice) -> row of the expert-major send buffer
    local_row_index: torch.Tensor | None  # [N_recv] received row -> grouped row; None: nothing received
    send_splits: list[int]  # rows sent to each ep rank
    recv_splits: list[int]  # rows received from each ep rank


class AllToAllDispatcher:
    """Token dispatch over an expert-parallel process group with two uneven all-to-alls.

    Same interface as `moonlight.model.model.LocalDispatcher`; see the module docstring. `align` pads
    each local expert's group of rows to a multiple of `align` (the grouped GEMM needs none); padding is
    added only after the exchange, so no padding rows travel.
    """

    communicates = True  # the MoE layer overlaps its shared experts with the all-to-alls

    def __init__(self, group: dist.ProcessGroup, align: int = 1):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.align = align

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, counts: torch.Tensor, impl: str):
        ep, num_experts = self.ep_size, counts.numel()
        if num_experts % ep:
            raise ValueError(f"{num_experts} experts cannot be split evenly over ep={ep} ranks")
        local_experts = num_experts // ep
        rows, counts, row_index = permute_tokens(x, expert_ids, num_experts, align=1, impl=impl, counts=counts)

        # 1. how many rows go to each (rank, local expert); receive [src rank, local expert]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        both = torch.cat([counts.view(ep, local_experts).sum(1), recv_counts.view(ep, local_experts).sum(1)])
        both = _read_on_host(both)  # the one host sync: split sizes of the row exchange
        send_splits, recv_splits = both[:ep], both[ep:]

        # 2. the rows themselves (autograd: the backward is the reverse all-to-all)
        recv = funcol.all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)
        recv = collective_result(recv)

        # 3. regroup [src rank][local expert] -> [local expert][src rank] (stable, so src-major inside)
        num_recv = sum(recv_splits)
        if num_recv == 0:  # nothing for our experts: keep the (empty) rows in the autograd graph so that
            # the backward all-to-alls still run here, matching the other ranks' collectives
            empty = torch.zeros(local_experts, dtype=counts.dtype, device=counts.device)
            return recv, empty, _A2AState(row_index, None, send_splits, recv_splits)
        local_ids = (
            torch.arange(local_experts, device=x.device).repeat(ep).repeat_interleave(recv_counts, output_size=num_recv)
        )
        grouped, local_counts, local_row_index = permute_tokens(
            recv, local_ids.unsqueeze(1), local_experts, align=self.align, impl=impl
        )
        return grouped, local_counts, _A2AState(row_index, local_row_index, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: _A2AState, impl: str) -> torch.Tensor:
        # undo 3: back to [src rank][local expert] order, a plain row gather (padding rows dropped)
        back = y if state.local_row_index is None else y.index_select(0, state.local_row_index)
        # undo 2: send each row home
        home = funcol.all_to_all_single_autograd(back, state.send_splits, state.recv_splits, self.group)
        home = collective_result(home)
        # undo 1 with the routing weights
        return unpermute_tokens(home, state.row_index, weights, impl=impl)


def _grouped_experts(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, align: int | None = None) -> nn.Module:
    """Shard routed experts over the 1-D `ep_mesh` (DTensor Shard(0)) and install all-to-all dispatch.

    Call before FSDP (which then shards the experts over the expert-dp ranks, see the module docstring)
    and on a model whose expert weights are plain tensors (meta, cpu or cuda; no TP on experts).
    `align` defaults to the current dispatcher's align. Works on pipeline stage models (only their MoE
    layers are touched). Returns the model, changed in place.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(
            f"apply_expert_parallel needs a 1-D ep mesh, got a {ep_mesh.ndim}-D mesh "
            f"{ep_mesh.mesh_dim_names}; pass mesh['ep'] (or a flattened sub-mesh)"
        )
    ep = ep_mesh.size()
    group = ep_mesh.get_group()
    for experts in _grouped_experts(model):
        num_experts = experts.args.n_routed_experts
        if num_experts % ep:
            raise ValueError(
                f"n_routed_experts={num_experts} is not divisible by ep={ep}: "
                f"choose ep among the divisors of {num_experts}"
            )
        for name in _EXPERT_WEIGHTS:
            param = getattr(experts, name)
            if isinstance(param, DTensor):
                raise ValueError(
                    f"expert weight {name} is already a DTensor ({param.placements}): apply "
                    "expert parallel before FSDP and do not tensor-parallelize routed experts"
                )
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        old = experts.dispatcher
        experts.dispatcher = AllToAllDispatcher(group, align=getattr(old, "align", 1) if align is None else align)
    return model
