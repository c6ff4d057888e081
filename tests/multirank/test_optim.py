"""moonlight.train.optim on gloo ranks: distributed Muon equals full-matrix Muon, FSDP2 over TP with
its DCP state dict, router bias counts all-reduced, and gradient clipping across meshes and stages."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from moonlight.train.balance import update_router_biases
from moonlight.train.optim import Muon, build_optimizers, clip_grad_norm_, zeropower_via_newtonschulz
from tests.dist import run_ranks
from tests.helpers import OPTIM_LR, OPTIM_WD, run_muon


# ------------------------------------------------------------------------------------------
# Distributed: DTensor shards / FSDP2 / EP / 2-D meshes equal single-device full-matrix Muon
# ------------------------------------------------------------------------------------------

N_STEPS = 3


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _dist_muon_worker(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    cases = [  # (name, full shape, mesh, param placements, grad placements)
        ("shard0", (30, 48), mesh, [Shard(0)], [Shard(0)]),  # uneven on 4 ranks
        ("shard1", (32, 48), mesh, [Shard(1)], [Shard(1)]),
        ("shard1_tall", (48, 32), mesh, [Shard(1)], [Replicate()]),  # grad with another placement
        ("ep", (4, 16, 24), mesh, [Shard(0)], [Shard(0)]),  # experts kept sharded
        ("expert_inner", (2, 16, 24), mesh, [Shard(2)], [Shard(2)]),
    ]
    if world == 4:
        m2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        cases += [
            ("2d_mesh", (32, 48), m2, [Shard(0), Shard(1)], [Shard(0), Shard(1)]),
            ("2d_mesh_swapped", (30, 48), m2, [Shard(1), Shard(0)], [Shard(1), Shard(0)]),
            ("2d_ep_tp", (4, 16, 24), m2, [Shard(0), Shard(1)], [Shard(0), Shard(1)]),
            ("2d_ep_ep", (4, 16, 24), m2, [Shard(0), Shard(0)], [Shard(0), Shard(0)]),
        ]
    errs = {}
    for ns_dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)  # same data on every rank
        W0s = [torch.randn(c[1]) for c in cases]
        grads = [[torch.randn(c[1]) for c in cases] for _ in range(N_STEPS)]
        refs = run_muon(W0s, grads, ns_dtype=ns_dtype)
        dps = [nn.Parameter(distribute_tensor(w.clone(), c[2], c[3])) for w, c in zip(W0s, cases)]
        opt = Muon(dps, lr=OPTIM_LR, weight_decay=OPTIM_WD, ns_dtype=ns_dtype)
        for step_grads in grads:
            for p, g, c in zip(dps, step_grads, cases):
                p.grad = distribute_tensor(g, c[2], c[4])
            opt.step()
        for p, ref, w0, c in zip(dps, refs, W0s, cases):
            assert isinstance(opt.state[p]["momentum_buffer"], DTensor)
            assert tuple(opt.state[p]["momentum_buffer"].placements) == tuple(c[3])
            moved = (ref - w0 * (1 - OPTIM_LR * OPTIM_WD) ** N_STEPS).abs().max().item()
            errs[(c[0], str(ns_dtype))] = ((p.full_tensor() - ref).abs().max().item(), moved)

    # FSDP2 fully_shard-ed module, identical inputs on every rank (grads are averaged over dp)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32, bias=False), nn.Tanh(), nn.Linear(32, 30, bias=False))
    ref_model = copy.deepcopy(model)
    fully_shard(model, mesh=mesh)
    opt = Muon(model.parameters(), lr=OPTIM_LR, weight_decay=OPTIM_WD, ns_dtype=torch.float32)
    ref_opt = Muon(ref_model.parameters(), lr=OPTIM_LR, weight_decay=OPTIM_WD, ns_dtype=torch.float32)
    for _ in range(N_STEPS):
        x = torch.randn(8, 48)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            m(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for (n, p), rp in zip(model.named_parameters(), ref_model.parameters()):
        assert isinstance(p, DTensor)
        errs[("fsdp2_" + n, "torch.float32")] = ((p.full_tensor() - rp.detach()).abs().max().item(), 1.0)

    # negative control: NS on each shard on its own is a different update
    torch.manual_seed(5)
    G = torch.randn(32, 48)
    full_o = zeropower_via_newtonschulz(G, dtype=torch.float32)
    local_g = distribute_tensor(G, mesh, [Shard(1)]).to_local()
    per_shard = zeropower_via_newtonschulz(local_g, dtype=torch.float32)
    full_slice = distribute_tensor(full_o, mesh, [Shard(1)]).to_local()
    errs[("per_shard_ns_differs", "")] = ((per_shard - full_slice).abs().max().item(), 0.0)
    return errs


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_muon_equals_full_matrix(world):
    results = run_ranks(_dist_muon_worker, world)
    for errs in results:
        for (name, dt), (err, moved) in errs.items():
            if name == "per_shard_ns_differs":
                assert err > 0.05, (name, err)  # so the exactness checks could fail
            elif dt == "torch.float32":
                assert err < 1e-5, (name, dt, err)
            else:  # bf16 NS: the full matrices are identical, so this is (nearly) exact too
                assert err < 0.02 * moved, (name, dt, err, moved)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 32, bias=False)
        self.down = nn.Linear(32, 48, bias=False)
        self.norm = nn.LayerNorm(48, bias=False)

    def forward(self, x):
        return self.norm(self.down(torch.tanh(self.up(x))))


def _fsdp_tp_worker(rank, world, precision_aware):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    m2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = _MLP()
    ref = copy.deepcopy(model)
    parallelize_module(model, m2["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=m2["dp"])  # up.weight becomes (_StridedShard(0), Shard(0))
    kw = dict(lr=OPTIM_LR, ns_dtype=torch.float32, precision_aware=precision_aware)
    opts = build_optimizers(model.named_parameters(), "muon", **kw)
    ref_opts = build_optimizers(ref.named_parameters(), "muon", **kw)
    for _ in range(N_STEPS):
        x = torch.randn(4, 48)
        for m, o in ((model, opts), (ref, ref_opts)):
            m(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    errs = {
        n: (p.full_tensor() - rp.detach()).abs().max().item()
        for (n, p), rp in zip(model.named_parameters(), ref.parameters())
    }
    # the checkpoint path: DCP's optimizer state dict over the list of optimizers
    sd = get_optimizer_state_dict(model, opts.optimizers)
    set_optimizer_state_dict(model, opts.optimizers, sd)
    return errs, sorted(sd["state"]["up.weight"].keys())


@pytest.mark.parametrize("precision_aware", [False, True])
def test_fsdp2_over_tp_and_dcp_state_dict(precision_aware):
    for errs, keys in run_ranks(_fsdp_tp_worker, 4, precision_aware):
        # TP changes the forward/backward reduction order, hence not bit-exact
        assert all(e < 1e-4 for e in errs.values()), errs
        assert keys == (["master", "momentum_buffer"] if precision_aware else ["momentum_buffer"])


def _router_allreduce_worker(rank, world):
    E = 4
    # rank 0 overloads expert 0, rank 1 overloads expert 3; summed over ranks, 0 and 3 are tied
    local = [
        torch.tensor([10, 0, 0, 2]) if rank == 0 else torch.tensor([0, 0, 1, 9]),
        torch.tensor([5, 5, 5, 5 + rank]),
    ]
    biases = [torch.zeros(E), torch.zeros(E)]
    total = update_router_biases(biases, local, rate=0.1)
    assert all(int(c.sum()) == 0 for c in local)
    return [b.tolist() for b in biases], total.tolist()


def test_router_bias_counts_are_all_reduced():
    (b0, t0), (b1, t1) = run_ranks(_router_allreduce_worker, 2)
    assert b0 == b1 and t0 == t1
    assert t0 == [[10, 0, 1, 11], [10, 10, 10, 11]]
    # mean 5.5: 10 and 11 overloaded (-0.1), 0 and 1 underloaded (+0.1); layer 2 mean 10.25
    assert b0[0] == pytest.approx([-0.1, 0.1, 0.1, -0.1])
    assert b0[1] == pytest.approx([0.1, 0.1, 0.1, -0.1])


# ------------------------------------------------------------------------------------------
# Gradient clipping across meshes / pipeline stages
# ------------------------------------------------------------------------------------------


def _clip_worker(rank, world):
    mesh_a = init_device_mesh("cpu", (world,))
    mesh_b = DeviceMesh("cpu", list(range(world)))  # same ranks, a different mesh object
    m2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    fulls = [torch.randn(8, 6), torch.randn(6, 10), torch.randn(4, 3, 5), torch.randn(7), torch.randn(5, 5)]
    grads = [torch.randn_like(t) for t in fulls]
    specs = [(mesh_a, [Shard(0)]), (mesh_b, [Shard(1)]), (m2["dp"], [Shard(0)]), (m2["tp"], [Replicate()]), None]
    params = []
    for t, g, spec in zip(fulls, grads, specs):
        if spec is None:
            p = nn.Parameter(t.clone())
            p.grad = g.clone()
        else:
            p = nn.Parameter(distribute_tensor(t.clone(), *spec))
            p.grad = distribute_tensor(g.clone(), *spec)
        params.append(p)
    want = torch.cat([g.reshape(-1) for g in grads]).norm()
    total = clip_grad_norm_(params, max_norm=1.0)
    scaled = [_full(p.grad) for p in params]
    scale_ok = all(torch.allclose(s, g / want, atol=1e-5) for s, g in zip(scaled, grads))
    # the trainer stacks the norm with the loss as it is: a plain fp32 tensor, never a DTensor
    scale_ok = scale_ok and type(total) is torch.Tensor and total.dtype == torch.float32

    # build_optimizers' torch AdamW copes with params on several meshes (one group per mesh)
    opts = build_optimizers([(f"w{i}", p) for i, p in enumerate(params)], "muon", lr=1e-2)
    opts.step()

    # pipeline stages: each rank holds different plain params
    torch.manual_seed(10 + rank)
    stage = [nn.Parameter(torch.randn(3, 4))]
    stage[0].grad = torch.randn(3, 4)
    local_sq = stage[0].grad.pow(2).sum()
    all_sq = local_sq.clone()
    dist.all_reduce(all_sq)
    pp_total = clip_grad_norm_(stage, max_norm=1e9, pp_group=dist.group.WORLD)
    inf_total = clip_grad_norm_(stage, max_norm=1e9, norm_type=float("inf"), pp_group=dist.group.WORLD)
    return (float(total), float(want), scale_ok, float(pp_total), float(all_sq.sqrt()), float(inf_total))


def test_clip_grad_norm_across_meshes_and_stages():
    for total, want, scale_ok, pp_total, pp_want, inf_total in run_ranks(_clip_worker, 2):
        assert total == pytest.approx(want, rel=1e-5)
        assert scale_ok
        assert pp_total == pytest.approx(pp_want, rel=1e-5)
        assert inf_total > 0
