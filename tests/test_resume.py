"""End to end through the trainer: N steps straight == N/2 steps + resume, on one process, with a
4-rank layout, onto another layout, and after a SIGKILL in the middle of a checkpoint save."""

import json
import multiprocessing as mp
import os
import shutil
import signal

import pytest
import torch

from moonlight.checkpoint.format import list_checkpoints
from moonlight.train.config import load_config
from moonlight.train.trainer import Trainer
from tests.dist import run_ranks

STEPS = 6
BASE = [f"--training.steps={STEPS}", "--training.seq_len=32", "--training.global_batch_size=4",
        "--training.local_batch_size=2", "--checkpoint.enable=true", "--checkpoint.interval=3",
        "--checkpoint.keep_latest_k=0", "--metrics.log_freq=1", "--metrics.device_peak_flops=1e11",
        "--lr_scheduler.warmup_steps=2", "--model.kernels=torch"]


def _run(folder, *extra):
    Trainer(load_config("train.toml", BASE + [f"--job.dump_folder={folder}", *extra])).train()


def _run_rank(rank, world, folder, extra):
    _run(folder, *extra)


def _losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _resume_copy(src, dst, step=3):
    """A new dump folder holding only `src`'s checkpoint at `step` (as if the job died right after it)."""
    os.makedirs(os.path.join(dst, "checkpoint"))
    shutil.copytree(os.path.join(src, "checkpoint", f"step-{step}"), os.path.join(dst, "checkpoint", f"step-{step}"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    _run(folder)
    assert sorted(list_checkpoints(folder / "checkpoint")) == [3, 6]
    return folder, _losses(folder)


def test_resume_one_process_equals_straight_run(straight, tmp_path):
    src, losses = straight
    _resume_copy(src, tmp_path)
    _run(tmp_path)
    resumed = _losses(tmp_path)
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
    _run(folder)
    os._exit(0)


def test_sigkill_during_save_then_resume(tmp_path):
    child = mp.get_context("fork").Process(target=_killed_mid_save, args=(tmp_path,))
    child.start()
    child.join(timeout=600)
    assert child.exitcode == -signal.SIGKILL
    ckpt = tmp_path / "checkpoint"
    assert sorted(list_checkpoints(ckpt)) == [3] and (ckpt / "step-6.tmp").exists()
    before = _losses(tmp_path)  # the killed run logged step 6 before its save began
    assert sorted(before) == list(range(1, STEPS + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: same reduction order, so bit-exact
    try:
        _run(tmp_path)  # resumes from step 3, ignoring (and removing) the partial step-6
    finally:
        torch.set_num_threads(threads)
    assert _losses(tmp_path) == before
    assert sorted(os.listdir(ckpt)) == ["step-3", "step-6"]


PP_FSDP = ["--parallelism.pp=2", "--parallelism.dp_shard=2"]


@pytest.fixture(scope="module")
def straight_4ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight4")
    run_ranks(_run_rank, 4, str(folder), PP_FSDP)
    meta = json.loads((folder / "checkpoint" / "step-3" / "meta.json").read_text())
    assert meta["world_size"] == 4
    return folder, _losses(folder)


@pytest.mark.slow
def test_resume_four_ranks_same_layout(straight_4ranks, tmp_path):
    src, losses = straight_4ranks
    _resume_copy(src, tmp_path)
    run_ranks(_run_rank, 4, str(tmp_path), PP_FSDP)
    resumed = _losses(tmp_path)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-6, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("world, layout", [
    (2, ["--parallelism.tp=2"]),
    (2, ["--parallelism.ep=2"]),
    (4, ["--parallelism.pp=2", "--parallelism.tp=2", "--parallelism.sequence_parallel=false"]),
    (1, []),
    (4, ["--parallelism.tp=2", "--parallelism.ep=4", "--parallelism.sequence_parallel=true"]),  # EP spans tp
], ids=["pp2_fsdp2_to_tp2", "pp2_fsdp2_to_ep2", "pp2_fsdp2_to_pp2_tp2", "pp2_fsdp2_to_single",
        "pp2_fsdp2_to_tp2_sp_ep4"])
def test_resume_onto_another_layout(straight_4ranks, tmp_path, world, layout):
    src, losses = straight_4ranks
    _resume_copy(src, tmp_path)
    if world == 1:
        _run(tmp_path, *layout)
    else:
        run_ranks(_run_rank, world, str(tmp_path), layout)
    resumed = _losses(tmp_path)
    # another layout reduces in another order: equal to fp32 rounding (as the layout tests)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses[s] for s in (4, 5, 6)], rel=1e-4, abs=1e-5)
