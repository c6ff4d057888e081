"""Host syncs of one MoE layer (forward + backward): none without expert parallel, one with it (the
all-to-all split sizes), and the layer compiles as one graph.

On a CPU there is no device queue to drain, so the run is instrumented instead: every op that
would read device memory back to the host on a GPU is counted (`.item()`, `bool()`, `int()` all
reach `aten._local_scalar_dense`; `torch.equal` returns a host bool; `.tolist()` does not dispatch
and is counted at the Python level; `nonzero`, `bincount`, `masked_select`, `unique` and
`repeat_interleave` without `output_size` read sizes back). On CUDA the same layer runs under
`torch.cuda.set_sync_debug_mode("error")`.
"""


import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from moonlight.config import ModelArgs
from moonlight.model.model import LocalDispatcher, MoE
from moonlight.parallel.expert import apply_expert_parallel
from tests.dist import run_ranks
from tests.helpers import host_syncs


def _args(**kw):
    return ModelArgs.preset("debug", **{"kernels": "torch", "aux_loss_alpha": 0.01, **kw})


def _moe(args, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    moe = MoE(args).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe.router.expert_bias.normal_(std=0.01)
    return moe.to(dtype).train()


def _step(moe, x):
    out = moe(x)
    out.square().sum().backward()
    return out


def _inputs(args, batch=2, seqlen=8, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, seqlen, args.hidden_size, generator=g).to(device, dtype)


@pytest.mark.parametrize("kernels,align", [("torch", 1), ("torch", 8), ("triton", 8)])
def test_moe_layer_has_no_host_sync(kernels, align):
    if kernels == "triton":
        pytest.importorskip("triton")
    args = _args(kernels=kernels)
    moe = _moe(args)
    moe.experts.dispatcher = LocalDispatcher(align=align)  # padded groups have a static size too
    x = _inputs(args)
    assert host_syncs(lambda: _step(moe, x)) == []
    assert moe.tokens_per_expert.sum() == x.shape[0] * x.shape[1] * args.num_experts_per_tok


def _ep_syncs(rank, world):
    args = _args()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = apply_expert_parallel(_moe(args), mesh, align=4)
    x = _inputs(args, batch=1 + rank)
    _step(moe, x)  # warm up (first collectives set up the group)
    return host_syncs(lambda: _step(moe, x))


def test_expert_parallel_moe_layer_syncs_once():
    for syncs in run_ranks(_ep_syncs, 2):
        assert syncs == ["tolist"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_layer_has_no_host_sync_on_cuda():
    args = _args(kernels="auto")
    moe = _moe(args, device="cuda", dtype=torch.bfloat16)
    x = _inputs(args, device="cuda", dtype=torch.bfloat16)
    _step(moe, x)  # warm up: lazy initialization may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(moe, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _forward_backward(moe, run, x):
    x = x.detach().requires_grad_()
    out = run(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return out.detach(), x.grad, grads, moe.tokens_per_expert.clone()


@pytest.mark.parametrize("kernels,align", [("torch", 1), ("triton", 8)])
def test_moe_layer_compiles_as_one_graph(kernels, align):
    """fullgraph=True: no graph break (so no host sync) anywhere in the layer; same outputs and grads."""
    if kernels == "triton":
        pytest.importorskip("triton")
    args = _args(kernels=kernels)
    x = _inputs(args)
    results = []
    for compiled in (False, True):
        moe = _moe(args)
        moe.experts.dispatcher = LocalDispatcher(align=align)
        torch._dynamo.reset()
        run = torch.compile(moe, backend="aot_eager", fullgraph=True) if compiled else moe
        results.append(_forward_backward(moe, run, x))
    (out, grad_x, grads, counts), (c_out, c_grad_x, c_grads, c_counts) = results
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_grad_x, grad_x)
    assert torch.equal(c_counts, counts)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, msg=lambda m: f"{name}: {m}")
