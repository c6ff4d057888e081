"""The shared experts issued first (on a side stream on CUDA, inline on a CPU) give bit-identical
outputs and gradients to the plain order, routed experts first, in one process."""

import pytest
import torch

from tests.helpers import assert_bit_identical, moe_overlap_args, moe_overlap_moe

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_shared_experts_first_is_bit_identical(device):
    args = moe_overlap_args()
    moe = moe_overlap_moe(args, device)
    moe.experts.dispatcher.communicates = True  # take the side-stream path without expert parallel
    x = torch.randn(2, 8, args.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    assert_bit_identical(moe, x)
