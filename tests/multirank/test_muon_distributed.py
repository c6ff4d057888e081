"""Distributed Muon (moonlight.train.muon) on gloo ranks: every full matrix and every expert matrix is
orthogonalized by exactly one rank of the group sharing it, and the weights equal single-process
full-matrix Muon bit for bit, in fp32 and with bf16 Newton-Schulz (FSDP, HSDP, TP, EP shards; the
trainer's real parallel configurations)."""

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import moonlight.train.muon as muon
from moonlight.config import ModelArgs
from moonlight.model import Moonlight
from moonlight.parallel.mesh import ParallelDims, build_mesh
from moonlight.parallel.parallelize import parallelize_model
from moonlight.train.optim import Muon, build_optimizers
from tests.dist import run_ranks

LR, WD, STEPS = 0.02, 0.1, 3


def _count_ns_calls() -> list[int]:
    """Wrap muon's Newton-Schulz so that every call records how many matrices it orthogonalized."""
    counts: list[int] = []
    original = muon.zeropower_via_newtonschulz

    def counting(G, *args, **kwargs):
        counts.append(1 if G.ndim == 2 else G.shape[0])
        return original(G, *args, **kwargs)

    muon.zeropower_via_newtonschulz = counting
    return counts


def _matrices(shape) -> int:
    return shape[0] if len(shape) == 3 else 1


def _single_process_muon(
    fulls: list[torch.Tensor], grads: list[list[torch.Tensor]], ns_dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    params = [nn.Parameter(w.clone()) for w in fulls]
    opt = Muon(params, lr=LR, weight_decay=WD, ns_dtype=ns_dtype)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def _shard(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    # Replicate -> any placement (also FSDP's _StridedShard) is a local chunk, no communication
    replicated = DTensor.from_local(full.clone(), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements)


# ------------------------------------------------------------------------------------------
# DTensor placements, one optimizer per case so NS calls are counted per case
# ------------------------------------------------------------------------------------------


CASES = [  # (name, full shape, mesh shape, placements); the 2-D mesh is (dp, tp) on 4 ranks
    ("fsdp_rows_uneven", (30, 48), 1, [Shard(0)]),
    ("fsdp_cols_tall", (48, 32), 1, [Shard(1)]),
    ("fewer_rows_than_ranks", (3, 40), 1, [Shard(0)]),
    ("replicated", (40, 24), 1, [Replicate()]),
    ("experts_split", (4, 16, 24), 1, [Shard(0)]),  # each rank holds whole experts: NS locally
    ("experts_inner", (6, 16, 24), 1, [Shard(2)]),  # 6 expert matrices spread over the ranks
    ("fsdp_x_tp", (32, 48), 2, [Shard(0), Shard(1)]),
    ("fsdp_x_tp_same_dim", (30, 48), 2, [Shard(1), Shard(1)]),
    ("hsdp", (30, 48), 2, [Replicate(), Shard(0)]),
    ("ep_x_tp", (4, 16, 24), 2, [Shard(0), Shard(1)]),
    ("efsdp_x_ep", (4, 16, 24), 2, [Shard(1), Shard(0)]),
    ("ep_x_ep", (4, 16, 24), 2, [Shard(0), Shard(0)]),
]


def _cases(world):
    return [c for c in CASES if c[2] == 1 or world == 4]


def _placements_worker(rank, world):
    meshes = {1: init_device_mesh("cpu", (world,))}
    if world == 4:
        meshes[2] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    cases = _cases(world)
    torch.manual_seed(0)  # the same full tensors on every rank
    fulls = [torch.randn(shape) for _, shape, _, _ in cases]
    grads = [[torch.randn(shape) for _, shape, _, _ in cases] for _ in range(STEPS)]
    refs = _single_process_muon(fulls, grads)
    # bf16 NS (Moonlight's): the pieces travel in bf16, the dtype NS casts to first, so still exact
    refs_bf16 = _single_process_muon(fulls, grads, torch.bfloat16)
    counts = _count_ns_calls()
    out = {}
    for i, (name, _, mesh_ndim, placements) in enumerate(cases):
        mesh = meshes[mesh_ndim]
        exact = []
        for ns_dtype, ref in ((torch.float32, refs[i]), (torch.bfloat16, refs_bf16[i])):
            p = nn.Parameter(_shard(fulls[i], mesh, placements))
            opt = Muon([p], lr=LR, weight_decay=WD, ns_dtype=ns_dtype)
            counts.clear()
            for step_grads in grads:
                p.grad = _shard(step_grads[i], mesh, placements)
                opt.step()
            exact.append(torch.equal(p.full_tensor(), ref))
        out[name] = (sum(counts), exact)  # NS calls of the bf16 run
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_each_matrix_orthogonalized_once_and_bit_exact(world):
    results = run_ranks(_placements_worker, world)
    for name, shape, _, _ in _cases(world):
        per_rank = [r[name][0] for r in results]
        assert sum(per_rank) == STEPS * _matrices(shape), (name, per_rank)  # once, not once per rank
        assert all(r[name][1] == [True, True] for r in results), f"{name}: weights differ from single-process Muon"


# ------------------------------------------------------------------------------------------
# The trainer's parallel configurations: the debug Moonlight parallelized as train.py does it
# ------------------------------------------------------------------------------------------


def _trainer_degrees_worker(rank, world, degrees):
    dims = ParallelDims(world_size=world, **degrees)
    mesh = build_mesh(dims, "cpu")
    torch.manual_seed(0)
    model = Moonlight(ModelArgs.preset("debug"))
    model.init_weights()
    full = {name: p.detach().clone() for name, p in model.named_parameters()}
    parallelize_model(model, dims, mesh, sequence_parallel=dims.tp > 1)
    # the copies TP leaves outside a DTensor (router, routed experts, kv_a_proj) share one NS too
    replicas = mesh["replicas"]
    opt = build_optimizers(
        model.named_parameters(), "muon", lr=LR, weight_decay=WD, ns_dtype=torch.float32, replica_mesh=replicas
    )[0]
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in opt.param_groups for p in group["params"]]
    torch.manual_seed(1)
    grads = [[torch.randn(p.shape) for p in params] for _ in range(STEPS)]
    refs = _single_process_muon([full[names[id(p)]] for p in params], grads)
    counts = _count_ns_calls()
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = _shard(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()
        opt.step()
    gathered = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in params]
    mismatched = [names[id(p)] for p, w, ref in zip(params, gathered, refs) if not torch.equal(w, ref)]
    placements = sorted({str(tuple(p.placements)) for p in params if isinstance(p, DTensor)})
    return sum(counts), sum(_matrices(p.shape) for p in params) * STEPS, mismatched, placements


@pytest.mark.parametrize(
    "world, degrees",
    [
        (2, dict(dp_shard=2)),
        (4, dict(dp_shard=4, ep=2)),
        (4, dict(dp_shard=2, tp=2)),
        (2, dict(dp_shard=1, tp=2)),
        # EP spanning tp: no copy of an expert outside its expert_fsdp group (FSDP-sharded over 2 tp ranks in tp4)
        pytest.param(4, dict(dp_shard=2, tp=2, ep=4), marks=pytest.mark.slow),
        pytest.param(4, dict(dp_shard=1, tp=4, ep=2), marks=pytest.mark.slow),
        (2, dict(dp_shard=1, cp=2)),  # cp ranks hold FSDP shards too (FSDP over dp_shard x cp)
        (4, dict(dp_shard=1, cp=2, tp=2)),
    ],
    ids=["fsdp2", "fsdp4_ep2", "fsdp2_tp2", "tp2", "fsdp2_tp2_ep4", "tp4_ep2", "cp2", "cp2_tp2"],
)
def test_trainer_degrees_orthogonalize_once_and_bit_exact(world, degrees):
    results = run_ranks(_trainer_degrees_worker, world, degrees)
    expected = results[0][1]
    per_rank = [r[0] for r in results]
    assert sum(per_rank) == expected, per_rank  # each (expert) matrix once across the ranks sharing it
    assert all(n > 0 for n in per_rank), per_rank  # the work is spread
    for _, _, mismatched, _ in results:
        assert not mismatched, f"differ from single-process Muon: {mismatched}"
    if degrees.get("tp") and degrees["dp_shard"] > 1:  # FSDP over TP: _StridedShard placements reassembled
        assert any("_StridedShard" in p for p in results[0][3]), results[0][3]
