"""End to end through the trainer in one process: N steps straight == N/2 steps + resume, also after
a SIGKILL in the middle of a checkpoint save."""

import multiprocessing as mp
import os
import signal

import pytest
import torch

from moonlight.checkpoint.format import list_checkpoints
from tests.helpers import RESUME_STEPS, resume_losses, resume_copy, run_job


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    run_job(folder)
    assert sorted(list_checkpoints(folder / "checkpoint")) == [3, 6]
    return folder, resume_losses(folder)


def test_resume_one_process_equals_straight_run(straight, tmp_path):
    src, losses = straight
    resume_copy(src, tmp_path)
    run_job(tmp_path)
    resumed = resume_losses(tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]  # bit-exact


def _killed_mid_save(folder):
    """Train straight; SIGKILL this process while it writes the step-6 checkpoint."""
    import torch.distributed.checkpoint.filesystem as fs

    torch.set_num_threads(1)
    real = fs._write_item

    def write(transforms, stream, *a, **k):
        if "step-6.tmp" in str(getattr(stream, "name", "")):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(transforms, stream, *a, **k)

    fs._write_item = write
    run_job(folder)
    os._exit(0)


def test_sigkill_during_save_then_resume(tmp_path):
    child = mp.get_context("fork").Process(target=_killed_mid_save, args=(tmp_path,))
    child.start()
    child.join(timeout=600)
    assert child.exitcode == -signal.SIGKILL
    ckpt = tmp_path / "checkpoint"
    assert sorted(list_checkpoints(ckpt)) == [3] and (ckpt / "step-6.tmp").exists()
    before = resume_losses(tmp_path)  # the killed run logged step 6 before its save began
    assert sorted(before) == list(range(1, RESUME_STEPS + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: same reduction order, so bit-exact
    try:
        run_job(tmp_path)  # resumes from step 3, ignoring (and removing) the partial step-6
    finally:
        torch.set_num_threads(threads)
    assert resume_losses(tmp_path) == before
    assert sorted(os.listdir(ckpt)) == ["step-3", "step-6"]
