"""The faults we survive on several ranks: a damaged shard of one rank's (every rank checksums its share
of the files, and all fall back to the same intact step), Ctrl-C under torchrun (every rank saves the
same step), a stuck rank (named after the collective timeout), and a user error that one nonzero rank
alone meets (printed once)."""

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from moonlight.checkpoint import format as fmt
from moonlight.checkpoint.format import list_checkpoints
from moonlight.checkpoint.state import Checkpointer
from moonlight.errors import ConfigError
from tests.helpers import FakeLoader, build, cfg
from tests.helpers import FAULTS_SMALL, ROOT, faults_damage


def _record_hashed_files():
    """Make fmt.file_record note the names this process checksums."""
    seen, original = [], fmt.file_record

    def recording(path):
        seen.append(os.path.basename(path))
        return original(path)

    fmt.file_record = recording
    return seen


def _two_rank_save(rank, world, folder):
    from tests.helpers import fsdp_wrap, build_opt

    seen = _record_hashed_files()
    model = fsdp_wrap(build()[0])
    opts, scheds = build_opt(model)
    ckpt = Checkpointer(cfg(), folder, [model], opts, scheds, FakeLoader())
    for s in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ckpt.save(s)
    return seen


def _two_rank_load(rank, world, folder):
    from tests.helpers import fsdp_wrap, build_opt

    seen = _record_hashed_files()
    model = fsdp_wrap(build(seed=7)[0])
    opts, scheds = build_opt(model)
    return Checkpointer(cfg(), folder, [model], opts, scheds, FakeLoader()).load(), seen


def test_checksums_are_split_across_ranks_and_a_damaged_rank_shard_falls_back(tmp_path):
    """Fault: a damaged shard written by rank 1 of a 2-rank FSDP run. Every rank checksums a different
    share of the files on save and on resume, and both ranks fall back to the same intact step."""
    from tests.dist import run_ranks

    saved = run_ranks(_two_rank_save, 2, str(tmp_path))
    step2 = tmp_path / "checkpoint" / "step-2"
    recorded = json.loads((step2 / "COMPLETE").read_text())["files"]
    assert set(recorded) == set(os.listdir(step2)) - {"COMPLETE"}
    assert {"__0_0.distcp", "__1_0.distcp", "rank-0.safetensors", "rank-1.safetensors"} <= set(recorded)
    assert all(saved) and not set(saved[0]) & set(saved[1]) and set(saved[1]) <= set(recorded)
    faults_damage(step2 / "__1_0.distcp")
    loaded = run_ranks(_two_rank_load, 2, str(tmp_path))
    assert [step for step, _ in loaded] == [1, 1]
    checked = [set(seen) for _, seen in loaded]
    assert checked[0] and checked[1] and not checked[0] & checked[1]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_on_every_rank(tmp_path):
    """Fault: untested: Ctrl-C reaches torchrun's agent, which forwards SIGINT to its workers; they must
    stop after the same step and save it (the agent's own exit code and traceback are torchrun's)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "train.py",
            "--config",
            "train.toml",
            *FAULTS_SMALL,
            f"--job.dump_folder={tmp_path}",
            "--training.steps=1000",
            "--checkpoint.enable=true",
            "--checkpoint.interval=1000",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"SIGINT: stopped after step {last}, checkpoint saved" in out
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [last]


def _joined_rank(rank, port, queue, body):
    """Join a 2-rank job as torchrun would (moonlight's init_process_group, 2 s collective timeout), run
    body(rank), and put (rank, what it printed on stderr) on the queue."""
    import io
    from moonlight.distributed import init_process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_process_group("gloo", 2.0)
    err, sys.stderr = sys.stderr, io.StringIO()
    try:
        body(rank)
    finally:
        queue.put((rank, sys.stderr.getvalue()))
        sys.stderr = err
        queue.close()
        queue.join_thread()  # before os._exit: the queue's feeder thread sends it
        os._exit(0)


def _in_two_ranks(body, wait_for):
    """Run body on two forked, joined ranks; returns {rank: stderr} of the first `wait_for` ranks to finish."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_joined_rank, args=(r, port, queue, body)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return dict(queue.get(timeout=60) for _ in range(wait_for))
    finally:
        for p in procs:
            p.kill()
            p.join()


def _stuck_rank_1(rank):
    import train

    if rank == 1:
        time.sleep(30)  # stops answering
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except RuntimeError as e:
        train.report_timeout(e)


def test_a_stuck_rank_is_named_after_the_collective_timeout():
    """Fault: a stopped rank hung the others for gloo's 30 minutes, then ~100 lines that named no rank."""
    line = _in_two_ranks(_stuck_rank_1, wait_for=1)[0]
    assert (
        line.startswith("error: a collective timed out after training.collective_timeout_s: rank(s) [1] did not answer")
        and line.count("\n") == 1
    )


def _user_error_on(failing):
    from moonlight.distributed import reported_by_rank0
    from moonlight.errors import exit_on_user_error

    def body(rank):
        def main():
            if rank in failing:
                raise ConfigError(f"bad input on rank {rank}")

        assert exit_on_user_error(main, reported_by_rank0) == (2 if rank in failing else 0)
        if rank == 0:
            time.sleep(4)  # rank 0 hosts the job's store here (torchrun's agent does under torchrun)

    return body


def test_a_user_error_on_one_nonzero_rank_alone_is_printed_once():
    """Fault: a user error that only rank 1 met was never printed (errors.py printed on rank 0 only)."""
    assert _in_two_ranks(_user_error_on({1}), wait_for=2) == {0: "", 1: "error: (rank 1) bad input on rank 1\n"}
    assert _in_two_ranks(_user_error_on({0, 1}), wait_for=2) == {0: "error: bad input on rank 0\n", 1: ""}
