"""The planner on 2 gloo ranks: rank 0's parameter, gradient and optimizer bytes under FSDP exactly, and
the context-parallel activation estimate counts the gathered keys."""

import pytest
import torch

from moonlight.plan import activation_bytes, plan
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import plan_cfg, plan_measured, plan_planned, saved_activation_bytes


def _fsdp_rank(rank, world, folder, extra):
    return plan_measured(Trainer(plan_cfg(folder, extra)))


@pytest.mark.parametrize(
    "extra",
    [[], ["--optimizer.precision_aware=true", "--training.dtype=bfloat16", "--parallelism.ep=2"]],
    ids=["fsdp2", "fsdp2-ep2-bf16-master"],
)
def test_fsdp_memory_is_exact_on_rank_0(tmp_path, extra):
    extra = ["--parallelism.dp_shard=2", *extra]
    measured = run_ranks(_fsdp_rank, 2, str(tmp_path), extra)
    assert plan_planned(plan(plan_cfg(tmp_path, extra), 2).ranks[0]) == measured[0]
    assert sum(measured[0]["params"].values()) >= sum(measured[1]["params"].values())  # rank 0 is the largest


def _cp_saved_bytes(rank, world, folder):
    """(estimate, measured) saved activations of cp rank `rank` (the model under context parallel alone,
    so that no FSDP-gathered weight counts)."""
    from torch.distributed.device_mesh import init_device_mesh

    from moonlight.model import Moonlight
    from moonlight.parallel.context import apply_context_parallel, zigzag_slice
    from moonlight.train.build import build_model_args

    cfg = plan_cfg(folder, ["--parallelism.cp=2", "--parallelism.dp_shard=1", "--training.seq_len=64"])
    args = build_model_args(cfg)
    torch.manual_seed(0)
    model = apply_context_parallel(Moonlight(args), init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
    batch, seq = cfg.training.local_batch_size, cfg.training.seq_len
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    tokens, positions = (zigzag_slice(t, world, rank) for t in (tokens, torch.arange(seq).expand(batch, seq)))
    measured = saved_activation_bytes(model, tokens, positions=positions)
    estimate = activation_bytes(
        args, cfg, list(range(args.num_hidden_layers)), True, tokens.numel(), keys_per_token=(2 * world - rank) / 2
    )
    return estimate, measured


@pytest.mark.slow
def test_context_parallel_activation_estimate_counts_the_gathered_keys(tmp_path):
    """cp rank 0 up-projects the keys of the whole sequence, rank 1 of three quarters of it."""
    (estimate0, measured0), (estimate1, measured1) = run_ranks(_cp_saved_bytes, 2, str(tmp_path))
    assert measured0 > measured1
    for estimate, measured in ((estimate0, measured0), (estimate1, measured1)):
        assert abs(estimate / measured - 1) < 0.25, (estimate, measured)
