"""The shared experts issued first stay bit-identical to the plain order (routed experts first) under
expert parallel on 2 gloo ranks."""

import torch
from torch.distributed.device_mesh import init_device_mesh

from moonlight.parallel.expert import apply_expert_parallel
from tests.dist import run_ranks
from tests.helpers import assert_bit_identical, moe_overlap_args, moe_overlap_moe


def _ep_rank(rank, world):
    args = moe_overlap_args()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = apply_expert_parallel(moe_overlap_moe(args, "cpu"), mesh)
    assert moe.experts.dispatcher.communicates
    x = torch.randn(1 + rank, 8, args.hidden_size, generator=torch.Generator().manual_seed(rank))
    assert_bit_identical(moe, x)
    return True


def test_shared_experts_overlap_is_bit_identical_under_expert_parallel():
    assert all(run_ranks(_ep_rank, 2))
