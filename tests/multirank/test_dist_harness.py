import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    assert rank != 1, "boom"
    return rank


def test_ranks_communicate():
    assert run_ranks(_all_reduce_rank, 2) == [1.0, 1.0]


def test_failure_in_one_rank_is_reported():
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
