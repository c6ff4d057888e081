"""checkpoint.async_mode = "async" in one process: the save is staged when it starts (training may
change the weights while it is written), COMPLETE appears only once the data is written (at wait: the
next save or the end), a kill while it is in flight leaves the previous step intact, and the trainer's
async run and its resume give the sync run's losses."""

import multiprocessing as mp
import os

import torch

from moonlight.checkpoint.format import MARKER, list_checkpoints
from moonlight.checkpoint.state import Checkpointer
from tests.helpers import FakeLoader, build, build_opt, cfg, train
from tests.helpers import ASYNC_CHECKPOINT, async_checkpoint_assert_same, async_checkpoint_snapshot


def _restored(folder, build_model=lambda: build(seed=9)[0]):
    model = build_model()
    opts, scheds = build_opt(model)
    loader = FakeLoader()
    step = Checkpointer(cfg(**ASYNC_CHECKPOINT), folder, [model], opts, scheds, loader).load()
    return step, async_checkpoint_snapshot(model, opts, loader)


def test_async_save_is_staged_and_complete_only_after_wait(tmp_path):
    model, opts, scheds = build()
    loader = FakeLoader()
    ck = Checkpointer(cfg(**ASYNC_CHECKPOINT), tmp_path, [model], opts, scheds, loader)
    train(model, opts, scheds, loader, 2)
    assert ck.save(2)
    at_save = async_checkpoint_snapshot(model, opts, loader)
    assert not ck.save(2)  # in flight: not started twice
    train(model, opts, scheds, loader, 1)  # training goes on while the save is written
    assert not os.path.exists(tmp_path / "checkpoint" / "step-2" / MARKER)
    assert list_checkpoints(tmp_path / "checkpoint") == {}
    ck.wait()
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [2]
    step, restored = _restored(tmp_path)
    assert step == 2
    async_checkpoint_assert_same(restored, at_save)  # the weights of step 2, not those trained after the save began
    assert ck.save(3)  # the next save finalizes nothing twice and writes step 3
    ck.wait()
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [2, 3]


def _killed_during_async_save(folder):
    torch.set_num_threads(1)  # GNU OpenMP is not fork-safe (as in tests/dist.py)
    model, opts, scheds = build()
    loader = FakeLoader()
    ck = Checkpointer(cfg(**ASYNC_CHECKPOINT), folder, [model], opts, scheds, loader)
    train(model, opts, scheds, loader, 1)
    ck.save(1)
    ck.wait()
    torch.save(async_checkpoint_snapshot(model, opts, loader), os.path.join(folder, "step1.pt"))
    train(model, opts, scheds, loader, 1)
    ck.save(2)
    os._exit(0)  # killed while step 2 is in flight


def test_kill_during_async_save_keeps_the_previous_step(tmp_path):
    p = mp.get_context("fork").Process(target=_killed_during_async_save, args=(str(tmp_path),))
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [1]
    step, restored = _restored(tmp_path)
    assert step == 1
    async_checkpoint_assert_same(restored, torch.load(tmp_path / "step1.pt", weights_only=False))


def test_trainer_async_run_and_resume_equal_the_sync_run(tmp_path):
    from tests.helpers import resume_losses, resume_copy, run_job

    run_job(tmp_path / "sync")
    run_job(tmp_path / "async", "--checkpoint.async_mode=async")
    sync, asynchronous = resume_losses(tmp_path / "sync"), resume_losses(tmp_path / "async")
    assert asynchronous == sync
    assert sorted(list_checkpoints(tmp_path / "async" / "checkpoint")) == [3, 6]  # the last one completed at the end
    resume_copy(tmp_path / "async", tmp_path / "resumed")
    run_job(tmp_path / "resumed", "--checkpoint.async_mode=async")
    resumed = resume_losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6] and [resumed[s] for s in (4, 5, 6)] == [sync[s] for s in (4, 5, 6)]
