"""Newton-Schulz orthogonalization for Muon, each matrix on exactly one rank.

    plans = plan_orthogonalization(params, ns_steps)          # once: who shares, who owns what
    outs = orthogonalize(plans, updates, settings, dtype)     # every step: 2 all-to-alls + NS

Muon's update is NS of the FULL matrix while FSDP/TP/EP shard it. Each full matrix (and each
expert matrix of a stacked [E, A, B] weight) is orthogonalized by one owner rank of the group that
shares it: one all-to-all brings the pieces to the owner, a second returns the result's pieces.
The result equals full-matrix Muon bit for bit. Every rank of ``group`` that holds a shared matrix
calls `orthogonalize` at the same step. Design and communication volume: docs/optimizers.md.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = [
    "NS_COEFFICIENTS",
    "NS_STACK_NUMEL",
    "zeropower_via_newtonschulz",
    "newton_schulz_stacked",
    "ns_flops",
    "MatrixPlan",
    "NSSettings",
    "sharing_group",
    "assign_owners",
    "plan_orthogonalization",
    "orthogonalize",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalize each matrix of ``G`` ([..., A, B]; batched over leading dims).

    Moonshot's ``zeropower_via_newtonschulz5``: cast to ``dtype``, transpose when A > B,
    normalize by the Frobenius norm of each matrix plus ``eps``, then ``steps`` quintic
    iterations. Returns a tensor of ``dtype`` with the shape of ``G``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    transpose = G.size(-2) > G.size(-1)
    if transpose:
        X = X.mT
    norm = X.norm() if X.ndim == 2 else X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm + eps)
    for _ in range(steps):
        A = X @ X.mT
        # Moonshot's B = b*A + (c*A) @ A and X = a*X + B @ X, op for op (a fused addmm rounds
        # differently in bf16); the three scalings in one foreach launch
        aX, bA, cA = torch._foreach_mul([X, A, A], [a, b, c])
        B = bA + cA @ A
        X = aX + B @ X
    if transpose:
        X = X.mT
    return X


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Multiply-add FLOPs of Newton-Schulz on one rows x cols matrix (X X^T, A A, B X per step)."""
    small, large = min(rows, cols), max(rows, cols)
    return steps * (4 * small * small * large + 2 * small**3)


Box = tuple[slice, slice]  # rows and cols of one rank's piece inside each full matrix


@dataclass
class MatrixPlan:
    """How one Muon parameter's matrices are orthogonalized.

    The local shard is viewed as ``[count, rows, cols]`` (``count`` = 1 for a 2-D weight, the local
    experts for a 3-D one); ``members[i]`` holds ``boxes[i]`` of every one of these ``count`` full
    ``shape`` matrices, ``owners[k]`` (an index into members) orthogonalizes matrix k.
    """

    members: tuple[int, ...]  # global ranks sharing these matrices, this rank among them
    me: int  # this rank's index in members
    boxes: tuple[Box, ...]
    shape: tuple[int, int]  # full matrix
    count: int
    stacked: bool  # a 3-D expert weight (NS runs batched over its experts)
    owners: tuple[int, ...] = ()

    @property
    def local(self) -> bool:
        return len(self.members) == 1

    @functools.cached_property
    def owned_by(self) -> dict[int, list[int]]:
        """owner -> the matrices it orthogonalizes, owners ascending (set ``owners`` first)."""
        out: dict[int, list[int]] = {}
        for k, o in enumerate(self.owners):
            out.setdefault(o, []).append(k)
        return dict(sorted(out.items()))

    @functools.cached_property
    def senders(self) -> dict[int, list[int]]:
        """owner -> the members whose piece it needs: one holder of each distinct (non-empty) box the
        owner lacks, so replicas of a box send it once."""
        first: dict[tuple, int] = {}
        for i, box in enumerate(self.boxes):
            if _box_numel(box):
                first.setdefault(_box_key(box), i)
        return {
            owner: sorted(i for key, i in first.items() if key != _box_key(self.boxes[owner]))
            for owner in self.owned_by
        }


def _box_key(box: Box) -> tuple:
    return tuple((s.start, s.stop) for s in box)


def _box_numel(box: Box) -> int:
    return (box[0].stop - box[0].start) * (box[1].stop - box[1].start)


def _check_tiling(plan: MatrixPlan) -> None:
    # Nested Shard/_StridedShard placements give every rank one contiguous box; say so loudly if a
    # sharding ever breaks that (the pieces would not reassemble the matrix).
    for dim, size in enumerate(plan.shape):
        spans = sorted({(b[dim].start, b[dim].stop) for b in plan.boxes if b[dim].stop > b[dim].start})
        ends = [0] + [stop for _, stop in spans]
        if [start for start, _ in spans] != ends[:-1] or ends[-1] != size:
            raise ValueError(
                f"Muon: the shards of a {plan.shape} matrix are not contiguous blocks along dim {dim} "
                f"({spans}); this placement cannot be reassembled"
            )


def _rank_grid(p: Tensor, replicas: DeviceMesh | None) -> tuple[Tensor, tuple[int, ...], list]:
    """The grid of global ranks that may hold ``p``'s matrices, this rank's coordinate in it, and
    ``p``'s placement on each grid dim: ``p``'s own DTensor mesh, widened by the dims of ``replicas``
    that the mesh lacks (``p`` is a copy there: Replicate). A plain tensor is a mesh of one."""
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        grid, mine, placements = mesh.mesh, tuple(mesh.get_coordinate()), list(p.placements)
        names = mesh.mesh_dim_names
    else:
        rank = dist.get_rank() if dist.is_initialized() else 0
        grid, mine, placements, names = torch.tensor([rank]), (0,), [Replicate()], ()
    if replicas is None or names is None or not set(names) <= set(replicas.mesh_dim_names):
        return grid, mine, placements
    own = [replicas.mesh_dim_names.index(n) for n in names]
    extra = [d for d in range(replicas.ndim) if d not in own]
    wide = replicas.mesh.permute(own + extra)
    coord = replicas.get_coordinate()
    wide_mine = tuple(coord[d] for d in own + extra)
    if names and not torch.equal(wide[(slice(None),) * len(own) + wide_mine[len(own) :]], grid):
        return grid, mine, placements  # a mesh with the same dim names but other ranks: not a slice
    return wide, wide_mine, placements[: len(own)] + [Replicate()] * len(extra)


def sharing_group(p: Tensor, replicas: DeviceMesh | None = None) -> MatrixPlan:
    """The ranks sharing ``p``'s matrices and the piece each holds (no owners yet).

    ``replicas``: a mesh over whose dims every weight is copied unless its own mesh shards it
    (e.g. the world without pp: TP leaves the router and routed experts replicated outside their
    DTensor); None = only ``p``'s own mesh shares it.
    """
    stacked = p.ndim == 3
    shape = (p.shape[-2], p.shape[-1])
    count = p.shape[0] if stacked else 1
    grid, mine, placements = _rank_grid(p, replicas)
    # grid dims that shard the expert dim split experts between ranks: those ranks share nothing
    # (FSDP's _StridedShard, used when it shards a dim EP or TP sharded first, is no Shard subclass)
    splits_experts = [stacked and isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0 for pl in placements]
    members, boxes, me = [], [], 0
    for coord in itertools.product(*(range(n) for n in grid.shape)):
        if any(split and c != m for split, c, m in zip(splits_experts, coord, mine)):
            continue
        # the same shard arithmetic as DTensor's own (and DCP's), for another rank's coordinate
        local_shape, offset = _compute_local_shape_and_global_offset(p.shape, grid.shape, list(coord), placements)
        if coord == mine:
            me = len(members)
            count = local_shape[0] if stacked else 1
        members.append(int(grid[coord]))
        boxes.append(tuple(slice(offset[d], offset[d] + local_shape[d]) for d in (-2, -1)))
    plan = MatrixPlan(tuple(members), me, tuple(boxes), shape, count, stacked)
    _check_tiling(plan)
    return plan


def assign_owners(plans: list[MatrixPlan], ns_steps: list[int]) -> None:
    """Set ``plan.owners``: each matrix to the least loaded member of its sharing group by NS FLOPs.

    Largest matrices first (ties in parameter order), per sharing group, so every member computes
    the same assignment from the same parameter list.
    """
    shared = sorted(
        (-ns_flops(*plan.shape, steps), i, k)  # largest first, then in parameter order
        for i, (plan, steps) in enumerate(zip(plans, ns_steps))
        if not plan.local
        for k in range(plan.count)
    )
    owners = [[0] * plan.count for plan in plans]  # a group of one owns its matrices
    loads: dict[tuple[int, ...], list[int]] = {}  # per sharing group: NS FLOPs given to each member
    for neg_cost, i, k in shared:
        load = loads.setdefault(plans[i].members, [0] * len(plans[i].members))
        owner = min(range(len(load)), key=load.__getitem__)  # the first least-loaded member
        load[owner] -= neg_cost
        owners[i][k] = owner
    for plan, own in zip(plans, owners):
        plan.owners = tuple(own)


def plan_orthogonalization(
    params: list[Tensor], ns_steps: list[int], replicas: DeviceMesh | None = None
) -> list[MatrixPlan]:
    """Sharing groups and owners of every parameter's matrices (``ns_steps`` per parameter)."""
    plans = [sharing_group(p, replicas) for p in params]
    assign_owners(plans, ns_steps)
    return plans


@dataclass(frozen=True)
class NSSettings:
    steps: int
    coefficients: tuple[float, float, float]
    eps: float


# Matrices of one shape and NS settings are orthogonalized as one stack, one batched matmul per product
# instead of one per matrix, up to this many elements per stack (NS's temporaries are a few stacks' size).
NS_STACK_NUMEL = 2**28


def newton_schulz_stacked(
    batches: dict[int, Tensor], settings: list[NSSettings], dtype: torch.dtype
) -> dict[int, Tensor]:
    """NS of every ``[k, rows, cols]`` tensor of ``batches`` (key i: parameter i, whose settings are
    ``settings[i]``), the same-shaped ones stacked (in key order, whole parameters, at most
    `NS_STACK_NUMEL` elements a stack unless one parameter alone is larger). Returns views of the
    stacks' results, in ``dtype``. Each matrix's result does not depend on the others in its stack
    (batched matmuls and per-matrix norms), so this equals NS of each parameter alone."""
    stacks: dict[tuple, list[list[int]]] = {}  # (shape, settings) -> lists of keys, one per stack
    for i, x in batches.items():
        if x.shape[0] == 0:
            continue
        chunks = stacks.setdefault((tuple(x.shape[1:]), settings[i]), [[]])
        if chunks[-1] and sum(batches[j].numel() for j in chunks[-1]) + x.numel() > NS_STACK_NUMEL:
            chunks.append([])
        chunks[-1].append(i)
    out = {i: x.to(dtype) for i, x in batches.items() if x.shape[0] == 0}
    for (_, s), chunks in stacks.items():
        for keys in chunks:
            xs = [batches[i] for i in keys]
            if len(xs) == 1:
                stack = xs[0]
            else:  # one copy into the stack, casting on the way
                stack = xs[0].new_empty((sum(x.shape[0] for x in xs), *xs[0].shape[1:]), dtype=dtype)
                torch._foreach_copy_(list(stack.split([x.shape[0] for x in xs])), xs)
            result = zeropower_via_newtonschulz(stack, s.steps, s.coefficients, s.eps, dtype)
            out.update(zip(keys, result.split([x.shape[0] for x in xs])))
    return out


def orthogonalize(
    plans: list[MatrixPlan],
    updates: list[Tensor],
    settings: list[NSSettings],
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """NS of every full matrix, on its owner; returns each rank's piece, shaped like its update.

    ``updates[i]``: this rank's shard of parameter i's (momentum-updated) update. Returned tensors
    are in ``dtype`` (the NS dtype, also the dtype the pieces travel in). ``device``: where the
    exchange buffers live (a rank may have nothing to send and must still take part). The matrices
    of this rank's unshared parameters and the full matrices it owns run as one set of stacks
    (`newton_schulz_stacked`).
    """
    pieces = [u.reshape(plan.count, *_box_shape(plan.boxes[plan.me])) for plan, u in zip(plans, updates)]
    inputs = {i: x for i, (plan, x) in enumerate(zip(plans, pieces)) if plan.local}
    exchange = None
    if len(inputs) < len(plans):  # a rank with unshared matrices only exchanges nothing
        pieces = [x if plan.local else x.to(dtype) for plan, x in zip(plans, pieces)]
        exchange = _Exchange(group, torch.empty(0, dtype=dtype, device=device))
        inputs.update(_gather_to_owners(plans, pieces, exchange))
    results = newton_schulz_stacked(inputs, settings, dtype)
    outs = {i: results[i] for i, plan in enumerate(plans) if plan.local}
    if exchange is not None:
        outs.update(_scatter_from_owners(plans, pieces, results, exchange))
    return [outs[i].reshape(u.shape) for i, u in enumerate(updates)]


class _Exchange:
    """One all-to-all over ``group`` between members given by global rank: queue what each rank
    sends and how much each sends here, then `run` returns the received elements per source."""

    def __init__(self, group: dist.ProcessGroup | None, empty: Tensor):
        self.group, self.empty = group, empty

    def rank(self, global_rank: int) -> int:
        return global_rank if self.group is None else dist.get_group_rank(self.group, global_rank)

    def run(self, send: dict[int, list[Tensor]], recv_numel: dict[int, int]) -> dict[int, Tensor]:
        world = dist.get_world_size(self.group)
        send_splits = [sum(t.numel() for t in send.get(r, ())) for r in range(world)]
        recv_splits = [recv_numel.get(r, 0) for r in range(world)]
        flat = [t.reshape(-1) for r in range(world) for t in send.get(r, ())]
        send_buffer = torch.cat(flat) if flat else self.empty
        recv_buffer = self.empty.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv_buffer, send_buffer, recv_splits, send_splits, group=self.group)
        return dict(zip(range(world), recv_buffer.split(recv_splits)))


def _gather_to_owners(plans: list[MatrixPlan], pieces: list[Tensor], exchange: _Exchange) -> dict[int, Tensor]:
    """Every distinct piece of a matrix to its owner (in parameter order per source); returns, for the
    parameters this rank owns matrices of, those full matrices ``[k, rows, cols]``."""
    send: dict[int, list[Tensor]] = {}
    expect: dict[int, list[tuple[int, list[int], int]]] = {}  # source -> (param, matrices, sender member)
    fulls: dict[int, Tensor] = {}
    for i, (plan, x) in enumerate(zip(plans, pieces)):
        if plan.local:
            continue
        for owner, ks in plan.owned_by.items():
            if owner == plan.me:
                fulls[i] = x.new_empty(len(ks), *plan.shape)
                fulls[i][(slice(None), *plan.boxes[plan.me])] = x[ks]
                for m in plan.senders[owner]:
                    expect.setdefault(exchange.rank(plan.members[m]), []).append((i, ks, m))
            elif plan.me in plan.senders[owner]:
                send.setdefault(exchange.rank(plan.members[owner]), []).append(x[ks])
    received = exchange.run(
        send, {src: sum(len(ks) * _box_numel(plans[i].boxes[m]) for i, ks, m in items) for src, items in expect.items()}
    )
    for src, items in expect.items():
        offset = 0
        for i, ks, m in items:
            box = plans[i].boxes[m]
            n = len(ks) * _box_numel(box)
            fulls[i][(slice(None), *box)] = received[src][offset : offset + n].view(len(ks), *_box_shape(box))
            offset += n
    return fulls


def _scatter_from_owners(
    plans: list[MatrixPlan], pieces: list[Tensor], results: dict[int, Tensor], exchange: _Exchange
) -> dict[int, Tensor]:
    """Every member's piece of each orthogonalized matrix from its owner; returns this rank's pieces
    of every shared parameter."""
    send: dict[int, list[Tensor]] = {}
    expect: dict[int, list[tuple[int, list[int]]]] = {}  # owner -> (param, matrices)
    outs: dict[int, Tensor] = {}
    for i, plan in enumerate(plans):
        if plan.local:
            continue
        outs[i] = torch.empty_like(pieces[i])
        for owner, ks in plan.owned_by.items():
            if owner != plan.me:
                expect.setdefault(exchange.rank(plan.members[owner]), []).append((i, ks))
                continue
            outs[i][ks] = results[i][(slice(None), *plan.boxes[plan.me])]
            for m, box in enumerate(plan.boxes):
                if m != plan.me:  # replicas of a box get their copy too
                    send.setdefault(exchange.rank(plan.members[m]), []).append(results[i][(slice(None), *box)])
    received = exchange.run(
        send, {src: sum(len(ks) * pieces[i][0].numel() for i, ks in items) for src, items in expect.items()}
    )
    for src, items in expect.items():
        offset = 0
        for i, ks in items:
            n = len(ks) * pieces[i][0].numel()
            outs[i][ks] = received[src][offset : offset + n].view(len(ks), *pieces[i].shape[1:])
            offset += n
    return outs


def _box_shape(box: Box) -> tuple[int, int]:
    return (box[0].stop - box[0].start, box[1].stop - box[1].start)
