"""LoRA / DoRA fine-tuning on 2 FSDP ranks: the trainer's losses and adapter weights are the
single-process ones."""

import io

import pytest
import torch

from moonlight.train.trainer import Trainer
from tests.dist import gathered_weights, run_ranks
from tests.helpers import lora_cfg
from tests.helpers import lora_losses


def _fsdp_run(rank, world, folder, extra):
    trainer = Trainer(lora_cfg(folder, *extra))
    trainer.train()
    return gathered_weights(trainer.model_parts)


@pytest.mark.slow
def test_trainer_lora_fsdp2_equals_single_process(tmp_path):
    extra = ["--training.steps=3", "--lora.dora=true"]
    single = torch.load(io.BytesIO(_fsdp_run(0, 1, str(tmp_path / "one"), extra)))
    fsdp = torch.load(
        io.BytesIO(run_ranks(_fsdp_run, 2, str(tmp_path / "two"), extra + ["--parallelism.dp_shard=2"])[0])
    )
    assert lora_losses(tmp_path / "two") == pytest.approx(lora_losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    assert set(fsdp) == set(single)
    for k, v in single.items():
        torch.testing.assert_close(fsdp[k], v, atol=2e-5, rtol=1e-4, msg=k)
