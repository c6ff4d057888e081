"""Host syncs of a training step: an unlogged step reads back only ONE copy of (loss, grad norm) for
the non-finite check (the loss normalizer, the step's token count, stays a tensor, also when it is
summed over data-parallel ranks); a logged step adds one read of the MoE metrics. The logged values
equal the ones computed tensor by tensor."""

import contextlib

import pytest
import torch

from moonlight.train.config import load_config
from moonlight.train.balance import expert_load_imbalance
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks
from tests.helpers import host_syncs, recording_host_syncs

SMALL = ["--training.seq_len=32", "--training.global_batch_size=2", "--training.local_batch_size=2",
         "--checkpoint.enable=false", "--metrics.log_freq=2", "--metrics.device_peak_flops=1e11",
         "--lr_scheduler.warmup_steps=1", "--training.steps=4", "--moe.aux_loss_coeff=0.01"]


def test_syncs_on_logged_and_unlogged_steps(tmp_path):
    trainer = Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={tmp_path}"]))
    trainer.optimizers.step = lambda: None  # the optimizer's own bookkeeping is not the step's metrics
    counted, values = [], []
    for step in range(1, 5):
        counted.append(host_syncs(lambda: values.append(trainer.train_step())))
        trainer.step = step
    assert [trainer.logs_step(s) for s in range(1, 5)] == [False, True, False, True]
    assert counted[0] == counted[2] == ["tolist"], counted
    assert counted[1] == counted[3] == counted[0] + ["tolist"], counted
    assert "expert_load" not in values[0] and "aux_loss" not in values[0]
    assert len(values[1]["expert_load"]) == 3 and values[1]["aux_loss"] > 0
    assert values[1]["max_expert_load"] == pytest.approx(max(values[1]["expert_load"]), abs=1e-3)


def _unlogged_step_syncs(rank, world_size, folder):
    trainer = Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={folder}", "--parallelism.dp_shard=2",
                                                         "--training.global_batch_size=4"]))
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


def test_moe_metrics_match_tensor_reads(tmp_path):
    trainer = Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={tmp_path}"]))
    counts = torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    moe_layers = [m for m in trainer.model_parts[0].moe_layers()]
    for i, m in enumerate(moe_layers):
        m.last_aux_loss = torch.tensor(0.25 * (i + 1))
    got = trainer._moe_metrics(counts, moe_layers)
    imbalance = expert_load_imbalance(counts)
    assert got["expert_load"] == [round(float(x), 3) for x in imbalance]
    assert got["max_expert_load"] == float(imbalance.max())
    assert got["aux_loss"] == float(sum(m.last_aux_loss for m in moe_layers)) * trainer.n_forwards
    assert trainer._moe_metrics(torch.zeros(2, 4, dtype=torch.float64), moe_layers) == {}


def _loop_syncs(rank, world_size, folder):
    """Host syncs of a run on 2 data-parallel ranks from its second step on (the first initializes
    FSDP), where rank 1 alone is signalled during step 2: both stop after it."""
    trainer = Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={folder}/{rank}", "--training.steps=3",
                                                         "--parallelism.dp_shard=2", "--training.global_batch_size=4",
                                                         "--metrics.log_freq=100"]))
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
