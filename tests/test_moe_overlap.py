"""The shared experts issued first (on a side stream on CUDA, inline on a CPU) give bit-identical
outputs and gradients to the plain order, routed experts first; alone and under expert parallel."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from moonlight.config import ModelArgs
from moonlight.model.model import MoE
from moonlight.parallel.expert import apply_expert_parallel
from tests.dist import run_ranks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _args():
    return ModelArgs.preset("debug", kernels="torch", aux_loss_alpha=0.0)


def _moe(args, device):
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe.to(device).train()


def _plain_order(moe, x):
    """MoE.forward as it was before the overlap: routed experts, then the shared experts."""
    h = x.reshape(-1, x.shape[-1])
    weights, expert_ids, _ = moe.router(h)
    return (moe.experts(h, expert_ids, weights) + moe.shared_experts(h)).view(x.shape)


def _run(moe, forward, x):
    moe.zero_grad()
    x = x.detach().requires_grad_()
    out = forward(x)
    out.backward(torch.cos(out.detach() * 7))
    return [out.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


def _assert_bit_identical(moe, x):
    overlapped = _run(moe, moe, x)
    plain = _run(moe, lambda x: _plain_order(moe, x), x)
    assert len(overlapped) == len(plain)
    for a, b in zip(overlapped, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_experts_first_is_bit_identical(device):
    args = _args()
    moe = _moe(args, device)
    moe.experts.dispatcher.communicates = True  # take the side-stream path without expert parallel
    x = torch.randn(2, 8, args.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    _assert_bit_identical(moe, x)


def _ep_rank(rank, world):
    args = _args()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = apply_expert_parallel(_moe(args, "cpu"), mesh)
    assert moe.experts.dispatcher.communicates
    x = torch.randn(1 + rank, 8, args.hidden_size, generator=torch.Generator().manual_seed(rank))
    _assert_bit_identical(moe, x)
    return True


def test_shared_experts_overlap_is_bit_identical_under_expert_parallel():
    assert all(run_ranks(_ep_rank, 2))
