"""The faults we survive: hostile files, damaged checkpoints, two trainers on one folder, outputs that
overlap their inputs, divergence, Ctrl-C, and malformed inputs. Each test names its fault; each ends
in one clear error (a MoonlightError naming the file or setting) or a warned recovery, with nothing
lost and no foreign code run."""

import gzip
import json
import logging
import multiprocessing as mp
import os
import pathlib
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moonlight.checkpoint import format as fmt
from moonlight.checkpoint.format import list_checkpoints, write_model_only_checkpoint
from moonlight.checkpoint.state import Checkpointer
from moonlight.convert import main as convert_main
from moonlight.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from moonlight.hf import HFCheckpoint, load_hf, save_hf
from moonlight.train.config import load_config
from moonlight.data.documents import BadLineError, read_jsonl
from moonlight.data.megatron import MegatronIndexedDataset
from moonlight.train.metrics import MetricsLogger
from moonlight.data.tokenizer import build_tokenizer
from moonlight.train.trainer import Trainer
from tests.hf_reference import make_hf_model
from tests.helpers import FakeLoader, build, cfg, full_sd

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--training.seq_len=32", "--training.global_batch_size=4", "--training.local_batch_size=2",
         "--checkpoint.enable=false", "--metrics.log_freq=1", "--metrics.device_peak_flops=1e11",
         "--lr_scheduler.warmup_steps=2", "--model.kernels=torch"]


def _trainer(folder, *extra):
    return Trainer(load_config("train.toml", SMALL + [f"--job.dump_folder={folder}", *extra]))


class Plant:
    """A pickle whose unpickling creates a marker file: proof that foreign code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump(Plant(marker), f)


def _convert(*argv):
    with pytest.raises(SystemExit) as e:
        convert_main(list(map(str, argv)))
    return e.value.code


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model("moonlight", seed=0, dtype=torch.float32).save_pretrained(path)
    return path


def _saved_steps(tmp_path, steps=(1, 2), **kw):
    """A checkpoint folder with one trainer checkpoint per step (weights changed between them); returns
    (checkpointer, {step: full state dict})."""
    model, opts, scheds = build()
    ckpt = Checkpointer(cfg(**kw), tmp_path, model, opts, scheds, FakeLoader())
    saved = {}
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * s)
        ckpt.save(s)
        saved[s] = full_sd(model)
    return ckpt, saved


def _fresh(tmp_path, **kw):
    model, opts, scheds = build(seed=7)
    return model, Checkpointer(cfg(**kw), tmp_path, model, opts, scheds, FakeLoader())


def _damage(path, n=64):
    """Flip n bytes in the middle of a file, keeping its size (silent corruption)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(n)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def _shard(step_dir):
    return sorted(p for p in pathlib.Path(step_dir).iterdir() if p.suffix == ".distcp")[0]


# ------------------------------------------------------------------------------------ no pickle


def test_the_package_never_unpickles_freely():
    """Fault: a torch.load / pickle.load of a user file would run code planted in it."""
    offenders = []
    for path in (REPO / "moonlight").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\((?!.*weights_only=True)|pickle\.loads?\(|weights_only\s*=\s*False", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_planted_pickles_are_never_unpickled(tmp_path, hf_dir):
    """Fault: pickles planted as train_state.pt, rank-0.pt, DCP .metadata, pytorch_model.bin. Resume
    ignores the stray files, refuses the planted metadata; load_hf and convert refuse pickles."""
    marker = tmp_path / "pwned"
    ckpt, saved = _saved_steps(tmp_path / "run", steps=(1,))
    step = tmp_path / "run" / "checkpoint" / "step-1"
    _plant(step / "train_state.pt", marker)
    _plant(step / "rank-0.pt", marker)
    model, fresh = _fresh(tmp_path / "run")
    assert fresh.load() == 1 and not marker.exists()

    # a planted .metadata, with COMPLETE rewritten to match (CRC-32 is no defence against an attacker)
    _plant(step / ".metadata", marker)
    marker_json = json.loads((step / "COMPLETE").read_text())
    marker_json["files"][".metadata"] = fmt.file_record(str(step / ".metadata"))
    (step / "COMPLETE").write_text(json.dumps(marker_json))
    with pytest.raises(CheckpointError, match=r"\.metadata asks to unpickle io\.open"):
        _fresh(tmp_path / "run")[1].load()
    assert _convert("dcp-to-hf", "--dcp", step, "--out", tmp_path / "hf_out") == 2
    assert not marker.exists()

    hf = tmp_path / "pickled_hf"
    hf.mkdir()
    (hf / "config.json").write_text((hf_dir / "config.json").read_text())
    _plant(hf / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_hf(hf)
    assert _convert("hf-to-dcp", "--hf", hf, "--out", tmp_path / "dcp_out") == 2
    assert not marker.exists()


# ---------------------------------------------------------------------------- checkpoint integrity


def test_a_corrupted_shard_falls_back_to_the_newest_intact_step(tmp_path, caplog):
    """Fault: 64 bytes of a .distcp overwritten in the latest checkpoint (same size). Resume names the
    file, warns once, and restores the previous step exactly."""
    _, saved = _saved_steps(tmp_path)
    bad = _shard(tmp_path / "checkpoint" / "step-2")
    _damage(bad)
    model, fresh = _fresh(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moonlight.checkpoint.state"):
        assert fresh.load() == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "resuming from step-1" in warnings[0]
    for k, v in full_sd(model).items():
        assert torch.equal(v, saved[1][k]), k


def test_a_damaged_requested_step_stops_and_names_the_last_good_one(tmp_path):
    """Fault: an explicit load_step whose shard is truncated; no silent fallback to another step."""
    _saved_steps(tmp_path)
    bad = _shard(tmp_path / "checkpoint" / "step-2")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 10)
    with pytest.raises(CheckpointError, match=rf"step-2 is damaged: {re.escape(str(bad))}: \d+ bytes, COMPLETE "
                                              r"records \d+.*--checkpoint\.load_step=1"):
        _fresh(tmp_path)[1].load(2)
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "checkpoint", "--out", tmp_path / "hf") == 2
    assert not (tmp_path / "hf").exists()


def test_no_intact_step_left_is_an_error_not_a_fresh_start(tmp_path):
    """Fault: every checkpoint damaged. Starting from scratch would silently lose the run."""
    _saved_steps(tmp_path)
    for s in (1, 2):
        _damage(_shard(tmp_path / "checkpoint" / f"step-{s}"))
    with pytest.raises(CheckpointError, match="step-2 is damaged.*no intact checkpoint is left"):
        _fresh(tmp_path)[1].load()


def test_checkpoints_of_format_version_1_still_load(tmp_path):
    """Compatibility: COMPLETE markers written before sizes and checksums (names only) still load."""
    _, saved = _saved_steps(tmp_path, steps=(1,))
    step = tmp_path / "checkpoint" / "step-1"
    (step / "COMPLETE").write_text(json.dumps({"complete": True, "files": sorted(os.listdir(step))}))
    meta = json.loads((step / "meta.json").read_text())
    (step / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    model, fresh = _fresh(tmp_path)
    assert fresh.load() == 1
    assert all(torch.equal(v, saved[1][k]) for k, v in full_sd(model).items())


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
    _damage(step2 / "__1_0.distcp")
    loaded = run_ranks(_two_rank_load, 2, str(tmp_path))
    assert [step for step, _ in loaded] == [1, 1]
    checked = [set(seen) for _, seen in loaded]
    assert checked[0] and checked[1] and not checked[0] & checked[1]


# -------------------------------------------------------------------------------- one trainer


def test_a_second_trainer_on_a_locked_folder_refuses_and_touches_nothing(tmp_path):
    """Fault: two trainers on one dump folder (deleted temp saves, interleaved metrics, overwritten
    config.toml). The second stops at once, naming the owner."""
    owner = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"host": socket.gethostname(), "pid": owner.pid, "started": "2026-01-01T00:00:00+00:00"}
        (tmp_path / ".lock").write_text(json.dumps(lock))
        with pytest.raises(ConfigError, match=rf"in use by another trainer \(pid {owner.pid} on this host"):
            _trainer(tmp_path, "--training.steps=2")
        assert os.listdir(tmp_path) == [".lock"] and json.loads((tmp_path / ".lock").read_text()) == lock
        elsewhere = {**lock, "host": "another-host"}  # its pid cannot be checked from here
        (tmp_path / ".lock").write_text(json.dumps(elsewhere))
        with pytest.raises(ConfigError, match=r"on host another-host.*if it is no longer running, delete .*\.lock"):
            _trainer(tmp_path, "--training.steps=2")
        assert os.listdir(tmp_path) == [".lock"]
    finally:
        owner.kill()
        owner.wait()


def test_a_dump_folder_that_is_a_file_is_named(tmp_path):
    """Fault: a job.dump_folder that is a file (or lies under one) was a FileExistsError traceback on rank 0
    while the other ranks waited for its lock."""
    (tmp_path / "notes").write_text("mine")
    for folder in (tmp_path / "notes", tmp_path / "notes" / "run"):
        with pytest.raises(ConfigError, match=rf"cannot create job.dump_folder {folder}: .*use another --job"):
            _trainer(folder, "--training.steps=2")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_stale_lock_is_replaced_with_a_warning_and_released_at_the_end(tmp_path, caplog):
    """Fault: a lock left by a killed trainer (its pid is gone). The next run takes over, says so,
    and removes its own lock when it finishes."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="moonlight.train.lock"):
        trainer = _trainer(tmp_path, "--training.steps=2")
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    trainer.train()
    assert not (tmp_path / ".lock").exists() and (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------ delete only what we wrote


def test_cleanup_removes_only_our_interrupted_saves(tmp_path):
    """Fault: every '*.tmp' in the checkpoint folder was deleted, including a user's important.tmp/."""
    folder = tmp_path / "checkpoint"
    (folder / "important.tmp").mkdir(parents=True)
    (folder / "important.tmp" / "notes.txt").write_text("mine")
    (folder / "step-9.tmp").mkdir()
    _saved_steps(tmp_path, steps=(1,))
    assert (folder / "important.tmp" / "notes.txt").read_text() == "mine"
    assert not (folder / "step-9.tmp").exists()


def test_conversion_refuses_an_output_overlapping_its_input(tmp_path, hf_dir):
    """Fault: `dcp-to-hf --dcp RUN/checkpoint --out RUN --overwrite` deleted the whole run; hf-to-dcp
    did the same to its HF source."""
    _saved_steps(tmp_path / "run", steps=(1,))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    for out in (tmp_path / "run", tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint" / "step-1" / "x"):
        assert _convert("dcp-to-hf", "--dcp", tmp_path / "run" / "checkpoint", "--out", out, "--overwrite") == 2
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before
    hf_files = sorted(os.listdir(hf_dir))
    for out in (hf_dir, hf_dir / "dcp", hf_dir.parent):
        assert _convert("hf-to-dcp", "--hf", hf_dir, "--out", out, "--overwrite") == 2
    assert sorted(os.listdir(hf_dir)) == hf_files


def test_overwrite_replaces_only_our_own_files(tmp_path, hf_dir):
    """Fault: save_hf(overwrite=True) deleted unrelated files in the target. Overwrite now replaces an
    earlier export and refuses a directory holding anything else; same for model-only checkpoints,
    whose temporary directory no longer clobbers a user's '<out>.tmp'."""
    model = load_hf(hf_dir)
    out = tmp_path / "export"
    save_hf(model, out)
    save_hf(model, out, overwrite=True)  # an earlier export: replaced
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    (out / "README.md").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"holds files that are not part of a Hugging Face export: "
                                              r"\['README\.md'\]"):
        save_hf(model, out, overwrite=True)
    assert (out / "README.md").read_text() == "keep me" and (out / "model.safetensors").exists()

    dcp_out = tmp_path / "dcp"
    (tmp_path / "dcp.tmp").mkdir()
    (tmp_path / "dcp.tmp" / "mine.txt").write_text("x")
    write_model_only_checkpoint(model.state_dict(), dcp_out, model.args)
    write_model_only_checkpoint(model.state_dict(), dcp_out, model.args, overwrite=True)
    assert (tmp_path / "dcp.tmp" / "mine.txt").exists()
    (dcp_out / "notes").mkdir()
    with pytest.raises(CheckpointError, match=r"not part of a moonlight checkpoint: \['notes'\]"):
        write_model_only_checkpoint(model.state_dict(), dcp_out, model.args, overwrite=True)
    assert (dcp_out / "notes").is_dir() and fmt.is_complete(str(dcp_out))


# -------------------------------------------------------------------------------------- divergence


def _nan_window(trainer, calls):
    """Layer 2's attention output is NaN on these forward calls (2 micro-batches per step)."""
    n = {"calls": 0}

    def hook(module, inputs, output):
        n["calls"] += 1
        return output * float("nan") if n["calls"] in calls else output
    trainer.model_parts[0].layers["2"].attn.register_forward_hook(hook)


def test_divergence_saves_nothing_and_rotation_keeps_the_last_good_step(tmp_path, capsys):
    """Fault: with keep_latest_k=1, checkpoints of skipped (diverged) steps were saved and rotated the
    last good one away. Steps 5-6 are non-finite: no save at 6, step-4 survives the save at 8, and a
    stop names the step to resume from."""
    trainer = _trainer(tmp_path, "--training.steps=8", "--checkpoint.enable=true", "--checkpoint.interval=2",
                       "--checkpoint.keep_latest_k=1", "--training.on_nonfinite=skip",
                       "--training.max_consecutive_nonfinite=3")
    _nan_window(trainer, range(9, 13))  # steps 5 and 6
    trainer.train()
    out = capsys.readouterr().out
    assert "step 6: no checkpoint while steps are skipped as non-finite" in out
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [4, 8]
    trainer._nonfinite_in_a_row = 2
    with pytest.raises(NonFiniteError, match=r"step-4: resume from it with --checkpoint\.load_step=4"):
        trainer._handle_nonfinite(float("nan"), float("nan"))


# ----------------------------------------------------------------------------------------- signals


def _train_in_child(folder, slow_final_save):
    """The trainer as `train.py` runs it (its exit code becomes the child's)."""
    import train

    torch.set_num_threads(1)  # forked: never enter the parent's OpenMP pool
    if slow_final_save:
        save = Trainer._save

        def slow(self, force=False, final=False):
            if force:
                time.sleep(60)
            save(self, force=force, final=final)
        Trainer._save = slow  # the forked child's class only
    sys.exit(train.main(["--config", "train.toml", *SMALL, f"--job.dump_folder={folder}", "--training.steps=1000",
                         "--checkpoint.enable=true", "--checkpoint.interval=1000"]))


def _start_and_wait(folder, slow_final_save=False):
    child = mp.get_context("fork").Process(target=_train_in_child, args=(folder, slow_final_save))
    child.start()
    deadline = time.time() + 120
    while time.time() < deadline and not ((folder / "metrics.jsonl").exists()
                                          and len((folder / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    return child


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path, capfd):
    """Fault: Ctrl-C saved nothing and printed a traceback per rank; now it acts like SIGTERM."""
    child = _start_and_wait(tmp_path)
    os.kill(child.pid, signal.SIGINT)
    child.join(timeout=120)
    assert child.exitcode == 0
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [last]
    out = capfd.readouterr()
    assert f"SIGINT: stopped after step {last}, checkpoint saved" in out.out and "Traceback" not in out.err


def test_a_second_ctrl_c_aborts_at_once(tmp_path, capfd):
    """Fault: a user who presses Ctrl-C twice must not wait for the save (nor read a traceback)."""
    child = _start_and_wait(tmp_path, slow_final_save=True)
    os.kill(child.pid, signal.SIGINT)
    time.sleep(2)
    start = time.time()
    os.kill(child.pid, signal.SIGINT)
    child.join(timeout=30)
    assert child.exitcode == 130 and time.time() - start < 30
    assert not list_checkpoints(tmp_path / "checkpoint")
    err = capfd.readouterr().err
    assert "interrupted: aborted without saving" in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_on_every_rank(tmp_path):
    """Fault: untested: Ctrl-C reaches torchrun's agent, which forwards SIGINT to its workers; they must
    stop after the same step and save it (the agent's own exit code and traceback are torchrun's)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
                             "--config", "train.toml", *SMALL, f"--job.dump_folder={tmp_path}",
                             "--training.steps=1000", "--checkpoint.enable=true", "--checkpoint.interval=1000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"SIGINT: stopped after step {last}, checkpoint saved" in out
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [last]


# ------------------------------------------------------------------------------------------ inputs


def _megatron(prefix, seqs=((5, 6, 7), (8, 9)), dtype=np.uint16):
    flat = np.array(sum(map(list, seqs), []), dtype=dtype)
    flat.tofile(f"{prefix}.bin")
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    pointers = np.cumsum([0] + [len(s) for s in seqs[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(seqs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(seqs) + 1, dtype=np.int64).tobytes())


def test_megatron_files_are_checked_at_open(tmp_path):
    """Fault: a .bin shorter than its .idx was accepted, then crashed mid-run with a bare
    AssertionError; an odd-sized .bin and a truncated .idx gave raw numpy errors."""
    prefix = tmp_path / "x"
    _megatron(prefix)
    assert MegatronIndexedDataset(str(prefix))[1].tolist() == [8, 9]
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(DataError, match=rf"{re.escape(str(prefix))}\.bin: 6 bytes, but .* points up to byte 10"):
        MegatronIndexedDataset(str(prefix))
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(7)
    with pytest.raises(DataError, match=r"x\.bin: 7 bytes is not a whole number of uint16 tokens"):
        MegatronIndexedDataset(str(prefix))
    _megatron(prefix)
    with open(f"{prefix}.idx", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.idx") - 4)
    with pytest.raises(DataError, match=r"x\.idx: truncated Megatron index"):
        MegatronIndexedDataset(str(prefix))


def test_an_unreadable_megatron_file_is_named(tmp_path, monkeypatch):
    """Fault: an .idx without read permission was a PermissionError traceback (simulated: tests run as root)."""
    from moonlight.data import megatron

    prefix = tmp_path / "x"
    _megatron(prefix)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(megatron, "open", denied, raising=False)
    with pytest.raises(DataError, match=rf"{re.escape(str(prefix))}\.idx: cannot read it \(Permission denied\)"):
        megatron.load_megatron(str(prefix))


def test_hf_checkpoint_files_are_checked_at_open(tmp_path, hf_dir):
    """Fault: a truncated safetensors shard, an index without weight_map, and weight_map entries
    reaching outside the directory gave raw errors or read foreign files; a bad config.json too."""
    def copy(name):
        dst = tmp_path / name
        dst.mkdir()
        for f in os.listdir(hf_dir):
            (dst / f).write_bytes((hf_dir / f).read_bytes())
        return dst

    trunc = copy("truncated")
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(trunc / "model.safetensors") - 100)
    with pytest.raises(CheckpointError, match=r"truncated/model\.safetensors is not a readable safetensors file"):
        HFCheckpoint(trunc)

    idx = copy("indexed")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json is not a safetensors index .*weight_map"):
        HFCheckpoint(idx)
    (tmp_path / "outside.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    for target in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors"):
        (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": target}}))
        with pytest.raises(CheckpointError, match="names shard files outside its directory"):
            HFCheckpoint(idx)

    cfg_bad = copy("badconfig")
    (cfg_bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"badconfig/config\.json"):
        load_hf(cfg_bad)


def test_text_inputs_are_checked_and_name_the_file(tmp_path):
    """Fault: a truncated .jsonl.gz, an invalid tokenizer.json, tiktoken.model or tokenizer_config.json
    raised raw library errors, so did an unreadable jsonl file; tiktoken served a replaced tiktoken.model's
    old ranks; a lone surrogate in a JSON line crashed the tokenizer instead of honouring data.on_bad_line."""
    gz = tmp_path / "docs.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 50}).encode() + b"\n" for i in range(200)))
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"docs\.jsonl\.gz: corrupt or truncated gzip file after line \d+"):
        list(read_jsonl([str(gz)]))

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))

    tik = tmp_path / "tik"
    tik.mkdir()
    (tik / "tiktoken.model").write_text("YQ== 0\nYg== 1\n")
    assert build_tokenizer(str(tik)).vocab_size == 2 + 258
    (tik / "tiktoken.model").write_text("YQ== 0\nYg== 1\nYw== 2\n")  # replaced: read again, never a stale copy
    assert build_tokenizer(str(tik)).vocab_size == 3 + 258
    (tik / "tiktoken.model").write_text("YQ== 0\ngarbage line\n")
    with pytest.raises(DataError, match=r"tiktoken\.model:2: not a tiktoken ranks line"):
        build_tokenizer(str(tik))
    (tik / "tiktoken.model").write_text("YQ== 0\nYg== 1\n")
    (tik / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(DataError, match=r"tik/tokenizer_config\.json is not valid JSON"):
        build_tokenizer(str(tik))

    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere")  # unreadable, as a file without read permission
    with pytest.raises(DataError, match=r"gone\.jsonl: cannot read it \(No such file or directory\)"):
        list(read_jsonl([str(tmp_path / "gone.jsonl")]))

    lines = tmp_path / "surrogate.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n{"text": "fine"}\n')
    assert list(read_jsonl([str(lines)], on_bad_line="skip")) == ["ok", "fine"]
    with pytest.raises(BadLineError, match=r"surrogate\.jsonl:2: field 'text' is not valid Unicode"):
        list(read_jsonl([str(lines)], on_bad_line="error"))


def test_a_split_that_a_single_hf_dataset_lacks_is_refused(tmp_path):
    """Fault: data.split was ignored for hf data files (one dataset, no splits): training silently used
    all of them."""
    from moonlight.data.documents import read_hf

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"one dataset without splits; data\.split='validation' cannot apply"):
        list(read_hf(str(tmp_path / "d.jsonl"), split="validation"))


def test_our_metrics_survive_a_torn_line_and_a_fresh_run(tmp_path, caplog):
    """Fault: a torn last line in metrics.jsonl (kill, full disk) blocked resume; a fresh run in an old
    folder silently truncated the previous run's metrics."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with caplog.at_level(logging.WARNING, logger="moonlight.train.metrics"):
        MetricsLogger(str(tmp_path), 0, resume_step=3).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert any("dropping unreadable line 5" in r.getMessage() for r in caplog.records)

    previous = path.read_text()
    with caplog.at_level(logging.WARNING, logger="moonlight.train.metrics"):
        MetricsLogger(str(tmp_path), 0).close()
        MetricsLogger(str(tmp_path), 0).close()  # an empty file is not worth keeping
    assert (tmp_path / "metrics.jsonl.1").read_text() == previous and not (tmp_path / "metrics.jsonl.2").exists()
    assert any("moved to" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("override,match", [
    ("--optimizer.lr=inf", r"optimizer\.lr' expects float \(a finite number\), got .* 'inf'"),
    ("--optimizer.lr=nan", r"optimizer\.lr' expects float \(a finite number\)"),
    ("--training.max_norm=-inf", r"training\.max_norm' expects float \(a finite number\)"),
    ("--data.split=validation", r"data\.split = 'validation' applies to data\.format = 'hf' only"),
    ("--checkpoint.folder=/elsewhere", r"checkpoint\.folder = '/elsewhere' must be a relative path inside"),
    ("--checkpoint.folder=../other_run", r"checkpoint\.folder = '\.\./other_run' must be a relative path"),
])
def test_config_values_are_checked(override, match):
    """Fault: optimizer.lr=inf passed validation; data.split was ignored for a single dataset; a
    checkpoint.folder outside the (locked) dump folder let rotation delete another run's saves."""
    with pytest.raises(ConfigError, match=match):
        load_config("train.toml", [override]).validate()


def test_config_checks_that_need_the_model_or_the_device(tmp_path, monkeypatch):
    """Fault: seq_len above max_position_embeddings trained with no word; kernels='triton' on a CPU
    failed with '0 active drivers'."""
    with pytest.raises(ConfigError, match="training.seq_len = 2048 exceeds the model's max_position_embeddings = 1024"):
        _trainer(tmp_path, "--training.seq_len=2048")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="model.kernels = 'triton' needs a CUDA GPU"):
        _trainer(tmp_path, "--model.kernels=triton")


def test_unreadable_config_files_are_config_errors(tmp_path):
    """Fault: a config file that is not UTF-8, or is a directory, raised a raw exception."""
    (tmp_path / "latin1.toml").write_bytes('[job]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text"):
        load_config(str(tmp_path / "latin1.toml"))
    with pytest.raises(ConfigError, match="is a directory; pass a .toml file"):
        load_config(str(tmp_path))


def test_convert_validates_every_argument_before_reading_tensors(tmp_path, hf_dir, monkeypatch, capsys):
    """Fault: the convert CLI checked --out and --max-shard-size only after reading the whole model."""
    import moonlight.convert as convert

    def no_reading(*a, **k):
        raise AssertionError("tensors were read before the arguments were checked")
    monkeypatch.setattr(convert, "save_hf_from_dcp", no_reading)
    monkeypatch.setattr(convert, "HFCheckpoint", no_reading)
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        (["dcp-to-hf", "--dcp", dcp, "--out", tmp_path / "o", "--dtype", "fp7"], "--dtype"),
        (["dcp-to-hf", "--dcp", dcp, "--out", tmp_path / "o", "--max-shard-size", "lots"], "max_shard_size"),
        (["dcp-to-hf", "--dcp", tmp_path / "nope", "--out", tmp_path / "o"], "nope does not exist"),
        (["dcp-to-hf", "--dcp", dcp, "--out", dcp / "inside"], "overlaps the input"),
        (["dcp-to-hf", "--dcp", dcp, "--out", tmp_path / "file"], "is not a directory"),
        (["hf-to-dcp", "--hf", hf_dir, "--out", tmp_path / "file"], "is not a directory"),
        (["hf-to-dcp", "--hf", hf_dir, "--out", hf_dir], "overlaps the input"),
    ]
    for argv, match in cases:
        assert _convert(*argv) == 2, argv
        assert match in capsys.readouterr().err, argv
