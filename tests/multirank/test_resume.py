"""End to end through the trainer on gloo ranks: N steps straight == N/2 steps + resume, on 4 ranks with
the same parallelism and onto another parallel configuration."""

import json

import pytest

from tests.dist import run_ranks
from tests.helpers import resume_losses, resume_copy, run_job


def _run_rank(rank, world, folder, extra):
    run_job(folder, *extra)


PP_FSDP = ["--parallelism.pp=2", "--parallelism.dp_shard=2"]


@pytest.fixture(scope="module")
def straight_4ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight4")
    run_ranks(_run_rank, 4, str(folder), PP_FSDP)
    meta = json.loads((folder / "checkpoint" / "step-3" / "meta.json").read_text())
    assert meta["world_size"] == 4
    return folder, resume_losses(folder)


@pytest.mark.slow
def test_resume_four_ranks_same_parallelism(straight_4ranks, tmp_path):
    src, losses = straight_4ranks
    resume_copy(src, tmp_path)
    run_ranks(_run_rank, 4, str(tmp_path), PP_FSDP)
    resumed = resume_losses(tmp_path)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, parallelism",
    [
        (2, ["--parallelism.tp=2"]),
        (2, ["--parallelism.ep=2"]),
        (4, ["--parallelism.pp=2", "--parallelism.tp=2", "--parallelism.sequence_parallel=false"]),
        (1, []),
        (4, ["--parallelism.tp=2", "--parallelism.ep=4", "--parallelism.sequence_parallel=true"]),  # EP spans tp
    ],
    ids=[
        "pp2_fsdp2_to_tp2",
        "pp2_fsdp2_to_ep2",
        "pp2_fsdp2_to_pp2_tp2",
        "pp2_fsdp2_to_single",
        "pp2_fsdp2_to_tp2_sp_ep4",
    ],
)
def test_resume_onto_another_parallelism(straight_4ranks, tmp_path, world, parallelism):
    src, losses = straight_4ranks
    resume_copy(src, tmp_path)
    if world == 1:
        run_job(tmp_path, *parallelism)
    else:
        run_ranks(_run_rank, world, str(tmp_path), parallelism)
    resumed = resume_losses(tmp_path)
    # another parallelism reduces in another order: equal to fp32 rounding (as test_train_parallelisms)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-4, abs=1e-5)
