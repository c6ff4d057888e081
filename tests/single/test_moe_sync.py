"""Host syncs of one MoE layer (forward + backward) without expert parallel: none, and the layer
compiles as one graph with the same outputs and gradients.

On a CPU there is no device queue to drain, so the run is instrumented instead: every op that
would read device memory back to the host on a GPU is counted (`.item()`, `bool()`, `int()` all
reach `aten._local_scalar_dense`; `torch.equal` returns a host bool; `.tolist()` does not dispatch
and is counted at the Python level; `nonzero`, `bincount`, `masked_select`, `unique` and
`repeat_interleave` without `output_size` read sizes back). On CUDA the same layer runs under
`torch.cuda.set_sync_debug_mode("error")`."""

import pytest
import torch

from moonlight.model.model import LocalDispatcher
from tests.helpers import host_syncs
from tests.helpers import moe_sync_args, moe_sync_inputs, moe_sync_moe, moe_sync_step


@pytest.mark.parametrize("kernels,align", [("torch", 1), ("torch", 8), ("triton", 8)])
def test_moe_layer_has_no_host_sync(kernels, align):
    if kernels == "triton":
        pytest.importorskip("triton")
    args = moe_sync_args(kernels=kernels)
    moe = moe_sync_moe(args)
    moe.experts.dispatcher = LocalDispatcher(align=align)  # padded groups have a static size too
    x = moe_sync_inputs(args)
    assert host_syncs(lambda: moe_sync_step(moe, x)) == []
    assert moe.tokens_per_expert.sum() == x.shape[0] * x.shape[1] * args.num_experts_per_tok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_layer_has_no_host_sync_on_cuda():
    args = moe_sync_args(kernels="auto")
    moe = moe_sync_moe(args, device="cuda", dtype=torch.bfloat16)
    x = moe_sync_inputs(args, device="cuda", dtype=torch.bfloat16)
    moe_sync_step(moe, x)  # warm up: lazy initialization may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_sync_step(moe, x)
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
    args = moe_sync_args(kernels=kernels)
    x = moe_sync_inputs(args)
    results = []
    for compiled in (False, True):
        moe = moe_sync_moe(args)
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
