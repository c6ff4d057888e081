"""The trainer gives the single-process losses and final weights in every parallel configuration (fp32,
CPU, gloo): three optimizer steps, so the weights also check every step's gathered gradients."""

import io
import json

import pytest
import torch

from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.dist import gathered_weights, run_ranks
from tests.helpers import short_job

BASE = short_job({"training.steps": 3, "model.kernels": "torch"})


def _train(rank, world_size, folder, extra):
    trainer = Trainer(load_config("train.toml", BASE + [f"--job.dump_folder={folder}", *extra]))
    trainer.train()
    return gathered_weights(trainer.model_parts)


def _losses(folder, key="loss"):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line)[key] for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    weights = torch.load(io.BytesIO(_train(0, 1, folder, [])))
    return _losses(folder), _losses(folder, "grad_norm"), weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, parallelism",
    [
        (2, ["--parallelism.dp_shard=2"]),
        (2, ["--parallelism.tp=2", "--parallelism.sequence_parallel=true"]),
        (2, ["--parallelism.ep=2"]),
        (2, ["--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"]),
        (4, ["--parallelism.tp=2", "--parallelism.ep=2", "--training.local_batch_size=1"]),
        (4, ["--parallelism.pp=2", "--parallelism.dp_shard=2", "--training.local_batch_size=2"]),
        (4, ["--parallelism.pp=2", "--parallelism.tp=2", "--parallelism.sequence_parallel=false"]),
        (2, ["--parallelism.pp=2", "--parallelism.pp_virtual_stages=2", "--parallelism.pp_schedule=Interleaved1F1B"]),
        (4, ["--parallelism.dp_replicate=2", "--parallelism.dp_shard=2", "--training.local_batch_size=1"]),
        (4, ["--parallelism.ep=2", "--training.local_batch_size=1"]),
        # EP spanning tp (ep does not divide dp_shard=2): every tp rank routes its own sequence shard
        (4, ["--parallelism.tp=2", "--parallelism.ep=4", "--parallelism.sequence_parallel=true"]),
        (
            8,
            [
                "--parallelism.pp=2",
                "--parallelism.tp=2",
                "--parallelism.ep=4",
                "--parallelism.sequence_parallel=true",
                "--parallelism.pp_schedule=1F1B",
            ],
        ),
        # context parallel at seq_len 32: 2 * cp = 4 chunks of 8 tokens, two per rank
        (2, ["--parallelism.cp=2"]),
        (2, ["--parallelism.cp=2", "--parallelism.ep=2"]),
        (2, ["--parallelism.cp=2", "--activation_checkpoint.mode=selective"]),  # the recompute gathers again
        (2, ["--parallelism.cp=2", "--activation_checkpoint.mode=op"]),  # the gathered keys are kept
        (4, ["--parallelism.cp=2", "--parallelism.dp_shard=2", "--training.local_batch_size=1"]),
        # ep 4 spans both dp_shard ranks and both cp ranks of each
        (4, ["--parallelism.cp=2", "--parallelism.dp_shard=2", "--parallelism.ep=4", "--training.local_batch_size=1"]),
        (4, ["--parallelism.cp=2", "--parallelism.tp=2", "--parallelism.sequence_parallel=true"]),
        (4, ["--parallelism.cp=2", "--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"]),
        # ep 4 spans both cp ranks and both tp ranks of each: every rank routes a quarter of each sequence
        (4, ["--parallelism.cp=2", "--parallelism.tp=2", "--parallelism.ep=4", "--parallelism.sequence_parallel=true"]),
    ],
    ids=[
        "fsdp2",
        "tp2_sp",
        "ep2",
        "pp2_1f1b",
        "tp2_ep2",
        "pp2_fsdp2",
        "tp2_pp2",
        "pp2_vp2_interleaved",
        "hsdp2x2",
        "fsdp4_ep2",
        "tp2_sp_ep4",
        "tp2_sp_ep4_pp2",
        "cp2",
        "cp2_ep2",
        "cp2_ac_selective",
        "cp2_ac_op",
        "cp2_fsdp2",
        "cp2_fsdp2_ep4",
        "cp2_tp2_sp",
        "cp2_pp2",
        "cp2_tp2_sp_ep4",
    ],
)
def test_parallel_losses_and_weights_equal_single_process(world, parallelism, reference, tmp_path):
    losses, grad_norms, weights = reference
    gathered = torch.load(io.BytesIO(run_ranks(_train, world, str(tmp_path), parallelism)[0]))
    assert _losses(tmp_path) == pytest.approx(losses, rel=1e-4, abs=1e-5)
    # Muon and AdamW updates hardly depend on the gradient's scale: the norm checks it
    assert _losses(tmp_path, "grad_norm") == pytest.approx(grad_norms, rel=1e-4)
    assert set(gathered) == set(weights)
    for name, w in weights.items():
        torch.testing.assert_close(gathered[name], w, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
