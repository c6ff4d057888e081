"""[validation] on 2 gloo ranks: val_loss is the single-process value under fsdp2, tp2, pp2 (1F1B and the
split-backward schedules, whose backward actions a forward-only pass must skip) and cp2 (fp32)."""

import pytest

from moonlight.parallel.pipeline_layout import splits_backward_through_python_nodes
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import VALIDATION, validation_cfg, validation_records

PP2_VP2 = ["--parallelism.pp=2", "--parallelism.pp_virtual_stages=2"]
SPLIT_BACKWARD = pytest.mark.skipif(
    not splits_backward_through_python_nodes(), reason="this torch refuses the split-backward schedules"
)


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
        pytest.param(2, [*PP2_VP2, "--parallelism.pp_schedule=InterleavedZeroBubble"], marks=SPLIT_BACKWARD),
        pytest.param(2, [*PP2_VP2, "--parallelism.pp_schedule=ZBVZeroBubble"], marks=SPLIT_BACKWARD),
        # DualPipeV needs a micro-batch per stage: one local batch of 4 sequences (no accumulation)
        pytest.param(
            2,
            [*PP2_VP2, "--parallelism.pp_schedule=DualPipeV", "--training.local_batch_size=4"],
            marks=SPLIT_BACKWARD,
        ),
        (2, ["--parallelism.cp=2"]),
    ],
    ids=["fsdp2", "tp2", "pp2_1f1b", "pp2_vp2_interleaved_zb", "pp2_zbv", "pp2_dualpipev", "cp2"],
)
def test_val_loss_equals_single_process(world, parallelism, single, tmp_path):
    # with validation every step, the second val_loss also checks the training step run after a validation
    losses = run_ranks(_val_losses, world, str(tmp_path), parallelism)[0]
    assert losses == pytest.approx(single, rel=1e-4, abs=1e-5)
