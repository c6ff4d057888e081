"""Expert parallel on forked gloo ranks: dispatcher and full model steps equal one process."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moonlight.config import ModelArgs
from moonlight.kernels.moe_permute import count_tokens
from moonlight.model.model import LocalDispatcher, Moonlight
from moonlight.parallel.expert import AllToAllDispatcher, apply_expert_parallel
from tests.dist import reduce_grads_without_fsdp, run_ranks

ATOL, RTOL = 1e-5, 1e-4


def _portable(obj):
    """Tensors -> numpy (tensors sent through the harness's queue would need shared-memory fds)."""
    return torch.utils._pytree.tree_map(lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else t, obj)


def _t(a):
    return torch.from_numpy(a)


# ------------------------------------------------------------------ dispatcher alone


def _dispatch_inputs(ep, num_experts, hidden, top_k, seed=0, starve_last=False):
    """Per-rank (x, expert_ids, weights) with uneven token counts; expert 1 is never chosen and rank 0
    sends nothing to the last rank's experts (starve_last: no rank does)."""
    g = torch.Generator().manual_seed(seed)
    per_rank = []
    for r in range(ep):
        t = 3 + 2 * r
        ids = torch.stack([torch.randperm(num_experts - 1, generator=g)[:top_k] for _ in range(t)])
        ids = torch.where(ids >= 1, ids + 1, ids)  # skip expert 1
        if r == 0 or starve_last:  # nothing for the last rank's experts
            ids = ids % (num_experts - num_experts // ep)
            ids = torch.where(ids == 1, 0, ids)
            ids = torch.stack([torch.tensor([0, 2])[:top_k] if len(set(row.tolist())) < top_k else row for row in ids])
        x = torch.randn(t, hidden, generator=g)
        w = torch.rand(t, top_k, generator=g)
        per_rank.append((x, ids, w))
    weights = torch.randn(num_experts, hidden, hidden, generator=g) * 0.3
    return per_rank, weights


def _expert_fn(rows, counts, w):
    outs = [r @ w[e] for e, r in enumerate(rows.split(counts.tolist()))]
    return torch.cat(outs)


def _dispatcher_rank(rank, world, num_experts, align, impl, starve_last):
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    per_rank, weights = _dispatch_inputs(world, num_experts, 16, 2, starve_last=starve_last)
    x, ids, w = per_rank[rank]
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    el = num_experts // world
    local_w = weights[rank * el : (rank + 1) * el].clone().requires_grad_(True)
    disp = AllToAllDispatcher(mesh.get_group(), align=align)
    rows, counts, state = disp.dispatch(x, ids, count_tokens(ids, num_experts), impl)
    assert counts.shape == (el,)
    if align > 1:
        assert all(c % align == 0 for c in counts.tolist())
    out = disp.combine(_expert_fn(rows, counts, local_w), w, state, impl)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + rank))
    out.backward(grad_out)
    return _portable((out, x.grad, w.grad, local_w.grad))


@pytest.mark.parametrize(
    "world,align,impl,starve_last",
    [
        (2, 1, "torch", False),
        (4, 4, "torch", False),
        (2, 2, "triton", False),
        (2, 1, "torch", True),
        (4, 2, "torch", True),
    ],
)
def test_dispatcher_matches_local(world, align, impl, starve_last):
    if impl == "triton":
        pytest.importorskip("triton")
    num_experts = 8
    results = run_ranks(_dispatcher_rank, world, num_experts, align, impl, starve_last)
    per_rank, weights = _dispatch_inputs(world, num_experts, 16, 2, starve_last=starve_last)
    x = torch.cat([p[0] for p in per_rank]).requires_grad_(True)
    ids = torch.cat([p[1] for p in per_rank])
    w = torch.cat([p[2] for p in per_rank]).requires_grad_(True)
    full_w = weights.clone().requires_grad_(True)
    disp = LocalDispatcher()
    rows, counts, state = disp.dispatch(x, ids, count_tokens(ids, num_experts), "torch")
    out = disp.combine(_expert_fn(rows, counts, full_w), w, state, "torch")
    grad_out = torch.cat(
        [torch.randn(p[0].shape, generator=torch.Generator().manual_seed(100 + r)) for r, p in enumerate(per_rank)]
    )
    out.backward(grad_out)
    torch.testing.assert_close(torch.cat([_t(r[0]) for r in results]), out.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([_t(r[1]) for r in results]), x.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([_t(r[2]) for r in results]), w.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat([_t(r[3]) for r in results]), full_w.grad, atol=ATOL, rtol=RTOL)
    assert full_w.grad[1].abs().max() == 0  # the expert nobody chose


# ------------------------------------------------------------------ whole model


def _args(**kw):
    base = dict(kernels="torch", aux_loss_alpha=0.0, num_hidden_layers=3)
    base.update(kw)
    return ModelArgs.preset("debug", **base)


def _build(args):
    torch.manual_seed(1234)
    model = Moonlight(args)
    model.init_weights()
    # expert 3 of the first MoE layer is never chosen anywhere (empty on every rank)
    model.moe_layers()[0].router.expert_bias[3] = -1e3
    return model


def _batch(args, ep, per_rank_bsz, seqlen):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (ep * per_rank_bsz, seqlen + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model, inputs, labels):
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _ep_rank(rank, world, args, per_rank_bsz, seqlen):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = _build(args)
    apply_expert_parallel(model, mesh)
    el = args.n_routed_experts // world
    for p in (p for m in model.moe_layers() for p in m.experts.parameters()):
        assert isinstance(p, DTensor) and p.to_local().shape[0] == el
    inputs, labels = _batch(args, world, per_rank_bsz, seqlen)
    sl = slice(rank * per_rank_bsz, (rank + 1) * per_rank_bsz)
    loss = _loss(model, inputs[sl], labels[sl])
    loss.backward()
    reduce_grads_without_fsdp(model, mesh)
    loss_avg = loss.detach().clone()
    torch.distributed.all_reduce(loss_avg)
    loads = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if isinstance(g, DTensor) else g
    return _portable((loss_avg / world, grads, loads))


@pytest.mark.parametrize("world,aux", [(2, 0.01), (4, 0.0)])
def test_ep_step_matches_single_process(world, aux):
    args = _args(aux_loss_alpha=aux)
    per_rank_bsz, seqlen = 1, 6
    results = run_ranks(_ep_rank, world, args, per_rank_bsz, seqlen)
    ref = _build(args)
    inputs, labels = _batch(args, world, per_rank_bsz, seqlen)
    loss = _loss(ref, inputs, labels)
    loss.backward()
    # some expert gets no token on some rank (12 choices over 8 experts per rank), and expert 3 of the
    # first MoE layer none at all
    assert any((load == 0).any() for _, _, loads in results for load in loads)
    for rank_loss, grads, _ in results:
        torch.testing.assert_close(_t(rank_loss), loss.detach(), atol=ATOL, rtol=RTOL)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(_t(grads[name]), p.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    assert ref.layers["1"].ffn.experts.gate_proj.grad[3].abs().max() == 0


def test_apply_expert_parallel_rejects_uneven_split():
    def fn(rank, world):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        model = Moonlight(_args(n_routed_experts=6, num_experts_per_tok=2))
        with pytest.raises(ValueError, match="not divisible by ep=4"):
            apply_expert_parallel(model, mesh)
        return True

    assert all(run_ranks(fn, 4))
