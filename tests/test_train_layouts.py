"""The trainer gives the single-process losses in every parallel layout (fp32, CPU, gloo)."""

import json

import pytest

from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks

BASE = ["--training.steps=3", "--training.seq_len=32", "--training.global_batch_size=4",
        "--training.local_batch_size=2", "--checkpoint.enable=false", "--metrics.log_freq=1",
        "--metrics.device_peak_flops=1e11", "--lr_scheduler.warmup_steps=1", "--model.kernels=torch"]


def _train(rank, world_size, folder, extra):
    Trainer(load_config("train.toml", BASE + [f"--job.dump_folder={folder}", *extra])).train()


def _losses(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    _train(0, 1, folder, [])
    return _losses(folder)


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [
    (2, ["--parallelism.dp_shard=2"]),
    (2, ["--parallelism.tp=2", "--parallelism.sequence_parallel=true"]),
    (2, ["--parallelism.ep=2"]),
    (2, ["--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"]),
    (4, ["--parallelism.tp=2", "--parallelism.ep=2", "--training.local_batch_size=1"]),
    (4, ["--parallelism.pp=2", "--parallelism.dp_shard=2", "--training.local_batch_size=2"]),
], ids=["fsdp2", "tp2_sp", "ep2", "pp2_1f1b", "tp2_ep2", "pp2_fsdp2"])
def test_layout_losses_equal_single_process(world, layout, reference_losses, tmp_path):
    run_ranks(_train, world, str(tmp_path), layout)
    assert _losses(tmp_path) == pytest.approx(reference_losses, rel=1e-4, abs=1e-5)
