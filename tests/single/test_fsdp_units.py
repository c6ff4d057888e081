"""FSDP settings without ranks: torchtitan's reshard-after-forward rule under pipeline parallel, and
which parameter and reduce dtypes count as mixed precision."""

import torch

from moonlight.train.config import load_config
from moonlight.train.parallel_run import fsdp_reshard_after_forward


def test_reshard_after_forward_rule():
    def rule(*overrides):
        return fsdp_reshard_after_forward(load_config("train.toml", list(overrides)))

    assert rule() is True
    assert rule("--parallelism.pp=2") is False
    assert rule("--parallelism.pp=2", "--parallelism.fsdp_reshard_after_forward=always") is True
    assert rule("--parallelism.fsdp_reshard_after_forward=never") is False


def test_mixed_precision_is_any_cast_away_from_fp32():
    """One rule for the trainer's ParallelRun, parallelize_model and apply_fsdp: None (FSDP's "no cast")
    and fp32 under any spelling are not mixed precision; a bf16 parameter or reduce dtype is."""
    from moonlight.dtypes import is_mixed

    assert not is_mixed(None, None) and not is_mixed("float32", "fp32") and not is_mixed(torch.float32, None)
    assert is_mixed("bf16", "float32") and is_mixed(None, torch.bfloat16)
