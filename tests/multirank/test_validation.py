"""[validation] on 2 gloo ranks: val_loss is the single-process value under fsdp2, tp2, pp2 and cp2
(fp32)."""

import pytest

from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import VALIDATION, validation_cfg, validation_records


def _val_losses(rank, world, folder, extra):
    Trainer(validation_cfg(folder, *VALIDATION, *extra)).train()
    return [r["val_loss"] for r in validation_records(folder)] if rank == 0 else None


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _val_losses(0, 1, str(tmp_path_factory.mktemp("single")), [])


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, parallelism",
    [
        (2, ["--parallelism.dp_shard=2"]),
        (2, ["--parallelism.tp=2"]),
        (2, ["--parallelism.pp=2", "--parallelism.pp_schedule=1F1B"]),
        (2, ["--parallelism.cp=2"]),
    ],
    ids=["fsdp2", "tp2", "pp2_1f1b", "cp2"],
)
def test_val_loss_equals_single_process(world, parallelism, single, tmp_path):
    losses = run_ranks(_val_losses, world, str(tmp_path), parallelism)[0]
    assert losses == pytest.approx(single, rel=1e-4, abs=1e-5)
