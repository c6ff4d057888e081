"""The faults we survive: hostile files, damaged checkpoints, two trainers on one folder, outputs that
overlap their inputs, divergence, Ctrl-C, and malformed inputs. Each test names its fault; each ends
in one clear error (a MoonlightError naming the file or setting) or a warned recovery, with nothing
lost and no foreign code run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moonlight.checkpoint import format as fmt
from moonlight.checkpoint.format import list_checkpoints
from moonlight.checkpoint.state import Checkpointer
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
