"""PEFT adapters on 2 FSDP ranks: every rank loads its slice of the adapter file, and the export gathers
the slices back into the same file."""

import dataclasses
import os

import pytest
import torch

from moonlight.checkpoint.export import export_peft_adapter
from moonlight.hf_peft import save_peft_adapter
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import lora_cfg, randomize_adapters
from tests.helpers import lora_model
from tests.helpers import HF_PEFT_ARGS, read_all_adapter


def _init_and_export(rank, world, folder, adapter):
    trainer = Trainer(
        lora_cfg(
            folder,
            "--training.steps=1",
            "--lora.dora=true",
            f"--lora.init_adapter={adapter}",
            "--parallelism.dp_shard=2",
        )
    )
    export_peft_adapter(trainer.model_parts, os.path.join(folder, "out"), dataclasses.asdict(trainer.cfg.lora))


@pytest.mark.slow
def test_fsdp2_loads_and_exports_the_adapter_exactly(tmp_path):
    """Sharded adapters: every rank keeps its slice of the file, and the export gathers them back."""
    source = lora_model(HF_PEFT_ARGS, dora=True).float()
    randomize_adapters(source)
    save_peft_adapter(source, HF_PEFT_ARGS, {"rank": 4, "alpha": 16.0, "dora": True, "dropout": 0.0}, tmp_path / "src")
    run_ranks(_init_and_export, 2, str(tmp_path / "run"), str(tmp_path / "src"))
    before, after = read_all_adapter(tmp_path / "src"), read_all_adapter(tmp_path / "run" / "out")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
