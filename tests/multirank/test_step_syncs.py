"""Host syncs of a training step on 2 data-parallel ranks: the step's token count is summed over the
ranks without being read, and a stop request on any rank rides in the step's one host read."""

import contextlib

import pytest

from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import host_syncs, recording_host_syncs
from tests.helpers import STEP_SYNCS_SMALL


def _unlogged_step_syncs(rank, world_size, folder):
    trainer = Trainer(
        load_config(
            "train.toml",
            STEP_SYNCS_SMALL
            + [f"--job.dump_folder={folder}", "--parallelism.dp_shard=2", "--training.global_batch_size=4"],
        )
    )
    trainer.optimizers.step = lambda: None
    trainer.train_step()  # step 1 (FSDP's lazy initialization), step 2 is logged
    trainer.step = 1
    trainer.train_step()
    trainer.step = 2
    assert not trainer.logs_step(3)
    return host_syncs(trainer.train_step)


@pytest.mark.slow
def test_data_parallel_step_sums_the_token_count_without_reading_it(tmp_path):
    for counted in run_ranks(_unlogged_step_syncs, 2, str(tmp_path)):
        assert counted == ["tolist"], counted


def _loop_syncs(rank, world_size, folder):
    """Host syncs of a run on 2 data-parallel ranks from its second step on (the first initializes
    FSDP), where rank 1 alone is signalled during step 2: both stop after it."""
    trainer = Trainer(
        load_config(
            "train.toml",
            STEP_SYNCS_SMALL
            + [
                f"--job.dump_folder={folder}/{rank}",
                "--training.steps=3",
                "--parallelism.dp_shard=2",
                "--training.global_batch_size=4",
                "--metrics.log_freq=100",
            ],
        )
    )
    trainer.optimizers.step = lambda: None  # CPU optimizers read their step counts: not the loop's syncs
    step, counted = trainer.train_step, []
    with contextlib.ExitStack() as recording:

        def signalled_at_step_2():
            if trainer.step == 1:
                recording.enter_context(recording_host_syncs(counted))
                if rank == 1:
                    trainer._stop_signal = "SIGTERM"
            return step()

        trainer.train_step = signalled_at_step_2
        trainer.train()
    return counted, trainer.step


@pytest.mark.slow
def test_the_stop_flag_rides_in_the_step_read(tmp_path):
    """A stop request (SIGTERM/SIGINT on any rank) reaches every rank in the step's one host read: no
    all-reduce plus .item() of its own each step."""
    for counted, stopped_at in run_ranks(_loop_syncs, 2, str(tmp_path)):
        assert stopped_at == 2
        assert counted == ["tolist"], counted
