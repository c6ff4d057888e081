"""The faults we survive in one process: hostile files, damaged checkpoints, two trainers on one folder,
outputs that overlap their inputs, divergence, Ctrl-C, and malformed inputs. Each test names its fault;
each ends in one clear error (a MoonlightError naming the file or setting) or a warned recovery, with
nothing lost and no foreign code run."""

import errno
import gzip
import json
import logging
import multiprocessing as mp
import os
import pathlib
import pickle
import re
import shutil
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
from moonlight.model import Moonlight
from moonlight.train.config import load_config
from moonlight.data.documents import BadLineError, read_jsonl
from moonlight.data.megatron import MegatronIndexedDataset
from moonlight.train.metrics import MetricsLogger
from moonlight.data.tokenizer import build_tokenizer
from moonlight.train.trainer import Trainer
from tests.hf_reference import make_hf_model
from tests.helpers import FakeLoader, build, cfg, full_sd
from tests.helpers import FAULTS_SMALL, ROOT, faults_damage


def _trainer(folder, *extra):
    return Trainer(load_config("train.toml", FAULTS_SMALL + [f"--job.dump_folder={folder}", *extra]))


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


def _shard(step_dir):
    return sorted(p for p in pathlib.Path(step_dir).iterdir() if p.suffix == ".distcp")[0]


# ------------------------------------------------------------------------------------ no pickle


def test_the_package_never_unpickles_freely():
    """Fault: a torch.load / pickle.load of a user file would run code planted in it."""
    offenders = []
    for path in (ROOT / "moonlight").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\((?!.*weights_only=True)|pickle\.loads?\(|weights_only\s*=\s*False", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
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
    faults_damage(bad)
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
    with pytest.raises(
        CheckpointError,
        match=rf"step-2 is damaged: {re.escape(str(bad))}: \d+ bytes, COMPLETE "
        r"records \d+.*--checkpoint\.load_step=1",
    ):
        _fresh(tmp_path)[1].load(2)
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "checkpoint", "--out", tmp_path / "hf") == 2
    assert not (tmp_path / "hf").exists()


def test_no_intact_step_left_is_an_error_not_a_fresh_start(tmp_path):
    """Fault: every checkpoint damaged. Starting from scratch would silently lose the run."""
    _saved_steps(tmp_path)
    for s in (1, 2):
        faults_damage(_shard(tmp_path / "checkpoint" / f"step-{s}"))
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
    with pytest.raises(
        CheckpointError,
        match=r"holds files that are not part of a Hugging Face export: "
        r"\['README\.md'\]",
    ):
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
    trainer = _trainer(
        tmp_path,
        "--training.steps=8",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--checkpoint.keep_latest_k=1",
        "--training.on_nonfinite=skip",
        "--training.max_consecutive_nonfinite=3",
    )
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
    sys.exit(
        train.main(
            [
                "--config",
                "train.toml",
                *FAULTS_SMALL,
                f"--job.dump_folder={folder}",
                "--training.steps=1000",
                "--checkpoint.enable=true",
                "--checkpoint.interval=1000",
            ]
        )
    )


def _start_and_wait(folder, slow_final_save=False):
    child = mp.get_context("fork").Process(target=_train_in_child, args=(folder, slow_final_save))
    child.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (folder / "metrics.jsonl").exists() and len((folder / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.2)
    return child


def _signal_stops_and_saves(folder, sig):
    """Send `sig` to a training child; it must exit 0 after saving its last logged step. Returns that step."""
    child = _start_and_wait(folder)
    os.kill(child.pid, sig)
    child.join(timeout=120)
    assert child.exitcode == 0
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert sorted(list_checkpoints(folder / "checkpoint")) == [last]
    return last


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path, capfd):
    """Fault: Ctrl-C saved nothing and printed a traceback per rank; now it acts like SIGTERM."""
    last = _signal_stops_and_saves(tmp_path, signal.SIGINT)
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


@pytest.mark.parametrize(
    "override,match",
    [
        ("--optimizer.lr=inf", r"optimizer\.lr' expects float \(a finite number\), got .* 'inf'"),
        ("--optimizer.lr=nan", r"optimizer\.lr' expects float \(a finite number\)"),
        ("--training.max_norm=-inf", r"training\.max_norm' expects float \(a finite number\)"),
        ("--data.split=validation", r"data\.split = 'validation' applies to data\.format = 'hf' only"),
        ("--checkpoint.folder=/elsewhere", r"checkpoint\.folder = '/elsewhere' must be a relative path inside"),
        ("--checkpoint.folder=../other_run", r"checkpoint\.folder = '\.\./other_run' must be a relative path"),
    ],
)
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


# --- round 3: paths, rollback, signals ---


def _steps_of(path):
    return [json.loads(line)["step"] for line in pathlib.Path(path).read_text().splitlines()]


def test_a_rollback_moves_the_abandoned_branch_aside(tmp_path, capsys):
    """Fault: a rollback (load_step=N) replaced the later checkpoints and rewrote later metrics in place."""
    ckpt = ["--checkpoint.enable=true", "--checkpoint.interval=1", "--checkpoint.keep_latest_k=0"]
    _trainer(tmp_path, "--training.steps=3", *ckpt).train()
    old = {s: (tmp_path / "checkpoint" / f"step-{s}" / "COMPLETE").read_bytes() for s in (2, 3)}
    old_metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    trainer = _trainer(tmp_path, "--training.steps=3", "--checkpoint.load_step=1", *ckpt)
    [aside] = tmp_path.glob("abandoned-*")
    out = capsys.readouterr().out
    assert "resumed at step 1" in out and str(aside / "checkpoint") in out and "steps 2-3" in out
    assert {s: (aside / "checkpoint" / f"step-{s}" / "COMPLETE").read_bytes() for s in (2, 3)} == old
    assert (aside / "metrics.jsonl").read_text().splitlines() == old_metrics[1:]
    assert _steps_of(tmp_path / "metrics.jsonl") == [1]
    trainer.train()
    assert sorted(list_checkpoints(tmp_path / "checkpoint")) == [1, 2, 3]
    assert _steps_of(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert {s: (aside / "checkpoint" / f"step-{s}" / "COMPLETE").read_bytes() for s in (2, 3)} == old


def test_a_complete_step_is_never_replaced_silently(tmp_path):
    """Fault: format.finalize_dir replaced a complete step-N of the same number without a word."""
    ckpt, _ = _saved_steps(tmp_path, steps=(1,))
    before = (tmp_path / "checkpoint" / "step-1" / "COMPLETE").read_bytes()
    tmp = tmp_path / "checkpoint" / "step-1.tmp"
    tmp.mkdir()
    (tmp / "x").write_text("new")
    with pytest.raises(CheckpointError, match="already holds a complete checkpoint: refusing to replace it"):
        fmt.finalize_dir(str(tmp), str(tmp_path / "checkpoint" / "step-1"))
    assert (tmp_path / "checkpoint" / "step-1" / "COMPLETE").read_bytes() == before


def test_the_lock_follows_a_symlinked_checkpoint_folder(tmp_path):
    """Fault: a trainer whose checkpoint folder links to a running run's took no lock error."""
    first = _trainer(tmp_path / "a", "--training.steps=2", "--checkpoint.enable=true")
    locks = [tmp_path / "a" / ".lock", tmp_path / "a" / "checkpoint" / ".lock"]
    assert [json.loads(p.read_text())["pid"] for p in locks] == [os.getpid()] * 2
    first.lock.release()
    owner = subprocess.Popen(["sleep", "60"])  # the running trainer: another live process on this host
    try:
        for p in locks:
            p.write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid, "started": "x"}))
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "checkpoint").symlink_to(tmp_path / "a" / "checkpoint")
        with pytest.raises(ConfigError, match=r"a/checkpoint is in use by another trainer"):
            _trainer(tmp_path / "b", "--training.steps=2", "--checkpoint.enable=true")
        assert not (tmp_path / "b" / ".lock").exists()  # the refused run released what it took
        (tmp_path / "c").symlink_to(tmp_path / "a")  # the dump folder itself through a link
        with pytest.raises(ConfigError, match=r"a is in use by another trainer"):
            _trainer(tmp_path / "c", "--training.steps=2")
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.parametrize("name", ["config.toml", "metrics.jsonl"])
def test_a_symlinked_run_file_is_refused_and_its_target_untouched(tmp_path, name):
    """Fault: a symlinked config.toml or metrics.jsonl overwrote or truncated its target outside the folder."""
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(target)
    with pytest.raises(ConfigError, match=rf"run/{name} is a symlink .* remove the link"):
        _trainer(tmp_path / "run", "--training.steps=2")
    assert target.read_text() == "mine" and not (tmp_path / "run" / ".lock").exists()


def test_a_symlinked_step_directory_is_refused(tmp_path):
    """Fault: a step-N symlink in the checkpoint folder was read, and rotation would delete through it."""
    _saved_steps(tmp_path / "other", steps=(1,))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "step-1").symlink_to(tmp_path / "other" / "checkpoint" / "step-1")
    with pytest.raises(CheckpointError, match=r"step-1 \(a symlink: replace it with the directory itself\)"):
        _fresh(tmp_path)[1].load()


@pytest.mark.parametrize("entry", [".lock", "config.toml"])
def test_a_run_file_that_is_a_directory_is_one_line(tmp_path, entry):
    """Fault: a .lock or config.toml that is a directory gave a traceback (and the other ranks' gloo errors)."""
    (tmp_path / entry).mkdir()
    with pytest.raises(ConfigError, match=rf"{re.escape(entry)} is a directory"):
        _trainer(tmp_path, "--training.steps=2")
    assert (tmp_path / entry).is_dir()


def test_an_unwritable_dump_folder_is_one_line(tmp_path, monkeypatch):
    """Fault: a read-only dump folder was a traceback at start."""
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError, match=r"cannot write to job.dump_folder .* \(read-only filesystem\): make it"):
        _trainer(tmp_path, "--training.steps=2")


def test_a_lock_held_by_a_pid_that_is_not_a_trainer_says_so(tmp_path):
    """Fault: a lock naming a live pid reused by another program gave no hint that it may be stale."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": "x"}))
        with pytest.raises(ConfigError, match=r"now runs 'sleep 60', which may not be a trainer.*delete .*\.lock"):
            _trainer(tmp_path, "--training.steps=2")
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize(
    "override,match",
    [
        ("--metrics.tb_folder=/tmp/elsewhere", r"metrics\.tb_folder = '/tmp/elsewhere' must be a relative path inside"),
        ("--metrics.tb_folder=../x", r"metrics\.tb_folder = '\.\./x' must be a relative path inside"),
        ("--checkpoint.folder=hf", r"checkpoint\.folder = 'hf' collides with the run's own 'hf'"),
        ("--metrics.tb_folder=checkpoint", r"metrics\.tb_folder = 'checkpoint' collides with checkpoint\.folder"),
    ],
)
def test_output_folders_stay_inside_the_dump_folder(override, match):
    """Fault: metrics.tb_folder absolute or ../x wrote outside the dump folder; checkpoint.folder = 'hf' collided."""
    with pytest.raises(ConfigError, match=match):
        load_config("train.toml", [override]).validate()


def test_a_dump_folder_under_home_is_expanded(monkeypatch, tmp_path):
    """Fault: job.dump_folder = "~/run" created a literal ./~/run."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("train.toml", ["--job.dump_folder=~/run"]).validate()
    assert cfg.job.dump_folder == str(tmp_path / "run")


def test_a_data_glob_matching_the_dump_folder_is_refused(tmp_path):
    """Fault: a data.path glob that matched the run's own metrics.jsonl was read as training data."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"data\.path = .* matches .*metrics\.jsonl, inside job\.dump_folder"):
        load_config(
            "train.toml", [f"--data.path={tmp_path}/**/*.jsonl", f"--job.dump_folder={tmp_path / 'run'}"]
        ).validate()


def test_sighup_stops_saves_and_releases_the_lock(tmp_path, capfd):
    """Fault: SIGHUP (the SSH session closed) killed the run without a save and left a stale lock."""
    last = _signal_stops_and_saves(tmp_path, signal.SIGHUP)
    assert f"SIGHUP: stopped after step {last}, checkpoint saved" in capfd.readouterr().out
    assert not (tmp_path / ".lock").exists()


def test_disk_full_and_read_only_are_named_at_every_write(tmp_path, monkeypatch, hf_dir):
    """Fault: a full disk was "write error ... unexpected pos"; HF export and dcp-to-hf gave tracebacks."""
    import moonlight.hf as hf_mod
    import torch.distributed.checkpoint.filesystem as fs

    ckpt, _ = _saved_steps(tmp_path, steps=(1,))
    monkeypatch.setattr(
        fs,
        "_write_item",
        lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        ),
    )  # no errno
    with pytest.raises(CheckpointError, match=r"step-2 failed \(write error\)"):  # space is left: not a full disk
        ckpt.save(2)
    statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: type("Full", (), {"f_bavail": 0, "f_frsize": statvfs(p).f_frsize}))
    with pytest.raises(CheckpointError, match=r"step-2 failed \(disk full\)"):
        ckpt.save(2)
    monkeypatch.undo()
    monkeypatch.setattr(
        hf_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))
    )
    with pytest.raises(CheckpointError, match=r"writing the HF checkpoint .* failed: read-only filesystem"):
        save_hf(load_hf(str(hf_dir)), str(tmp_path / "export"))
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "checkpoint", "--out", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-save-*"))


def test_a_full_disk_at_start_is_one_line(tmp_path, monkeypatch):
    """Fault: ENOSPC writing config.toml at start was a traceback."""
    trainer_open = open

    def full(path, *a, **k):
        if str(path).endswith("config.toml") and a and "w" in a[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return trainer_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(ConfigError, match=r"cannot write .*config\.toml \(disk full\)"):
        _trainer(tmp_path, "--training.steps=2")


def test_a_full_disk_while_logging_metrics_is_one_warning_not_a_hang(tmp_path, caplog):
    """Fault: ENOSPC writing metrics.jsonl raised on rank 0 alone (a traceback; the other ranks hung)."""
    metrics = MetricsLogger(str(tmp_path), 0)
    metrics.close()

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = lambda self: None

    metrics._file = Full()
    with caplog.at_level(logging.ERROR, logger="moonlight.train.metrics"):
        for step in (1, 2, 3):
            metrics.log(step, {"loss": 1.0})
    assert [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()] == [
        f"metrics: cannot write {tmp_path / 'metrics.jsonl'} (disk full) from step 1 on: training goes on, its "
        "records are lost until it can be written (checkpoint saves fail loudly)"
    ]


def test_prepare_data_removes_its_temp_file_when_close_fails(tmp_path, monkeypatch):
    """Fault: prepare_data left a hidden temp file behind when close() failed (a full disk)."""
    from moonlight.data import megatron

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    monkeypatch.setattr(megatron, "_close_durably", full)
    tok = build_tokenizer("byte")
    with pytest.raises(DataError, match="disk full"):
        megatron.build_megatron_from_jsonl([str(docs)], str(tmp_path / "out"), tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_a_model_too_large_for_host_memory_is_refused_before_materialising(tmp_path, monkeypatch):
    """Fault: the 16B model on a small CPU machine was materialized until the kernel killed it."""
    import moonlight.train.build as build_mod

    monkeypatch.setattr(build_mod, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(ConfigError, match=r"15\.\dB-parameter model needs at least .* GiB of host memory .* 1\.0 GiB"):
        _trainer(tmp_path, "--model.name=moonlight-16b-a3b", "--model.overrides.vocab_size=512")


def test_a_damaged_format_1_checkpoint_names_the_earlier_step(tmp_path):
    """Fault: damage in a format-v1 checkpoint (no checksums) was a raw PytorchStreamReader traceback."""
    _saved_steps(tmp_path, steps=(1, 2))
    step = tmp_path / "checkpoint" / "step-2"
    (step / "COMPLETE").write_text(json.dumps({"complete": True, "files": sorted(os.listdir(step))}))
    shard = _shard(step)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(
        CheckpointError,
        match=r"step-2 cannot be read, its files are damaged \(its COMPLETE marker, "
        r"format_version 1.*resume from the earlier step-1",
    ):
        _fresh(tmp_path)[1].load()


def test_a_zero_padded_step_is_named_not_called_damaged(tmp_path):
    """Fault: a hand-copied step-004 was reported as "damaged"."""
    _saved_steps(tmp_path, steps=(4,))
    os.rename(tmp_path / "checkpoint" / "step-4", tmp_path / "checkpoint" / "step-004")
    with pytest.raises(CheckpointError, match=r"step-004 \(rename it to step-4\)"):
        _fresh(tmp_path)[1].load()


def test_a_nan_stop_under_async_saves_names_a_complete_step(tmp_path):
    """Fault: after a NaN stop under async saves the message named a step that existed only as .tmp."""
    trainer = _trainer(
        tmp_path,
        "--training.steps=4",
        "--checkpoint.enable=true",
        "--checkpoint.interval=2",
        "--checkpoint.async_mode=async",
        "--training.on_nonfinite=stop",
    )
    _nan_window(trainer, range(5, 9))  # step 3
    with pytest.raises(NonFiniteError, match=r"step-2: resume from it") as e:
        trainer.train()
    assert "step-2" in str(e.value) and sorted(list_checkpoints(tmp_path / "checkpoint")) == [2]


def test_checkpoints_with_checkpointing_off_are_refused(tmp_path):
    """Fault: checkpoint.enable=false over existing checkpoints silently started from scratch."""
    _trainer(tmp_path, "--training.steps=2", "--checkpoint.enable=true").train()
    before = (tmp_path / "config.toml").read_text()
    with pytest.raises(
        ConfigError,
        match=r"holds checkpoints \[2\] but checkpoint\.enable = false .* "
        r"--checkpoint\.enable=true",
    ):
        _trainer(tmp_path, "--training.steps=2", "--optimizer.lr=0.5")
    assert (tmp_path / "config.toml").read_text() == before


def test_dcp_to_hf_of_a_step_rotated_away_while_read_is_one_line(tmp_path, monkeypatch, capsys):
    """Fault: dcp-to-hf on a folder whose steps a running trainer rotates away was a 76-line traceback."""
    import moonlight.checkpoint.export as export_mod

    _saved_steps(tmp_path, steps=(1,))
    read = export_mod._DCPModel.read

    def rotated(self, keys):
        shutil.rmtree(tmp_path / "checkpoint" / "step-1")
        return read(self, keys)

    monkeypatch.setattr(export_mod._DCPModel, "read", rotated)
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "checkpoint", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "was removed while being read" in err and "keep_latest_k" in err and "Traceback" not in err


def test_an_export_path_that_is_a_file_fails_at_start(tmp_path):
    """Fault: checkpoint.export_hf into a path that is a file failed only after training."""
    (tmp_path / "hf").write_text("notes")
    with pytest.raises(ConfigError, match=r"/hf is a file where moonlight writes its own folder"):
        _trainer(tmp_path, "--training.steps=2", "--checkpoint.export_hf=end")
    assert (tmp_path / "hf").read_text() == "notes"


def _env_main(env, argv):
    """train.main in a forked child with `env`; returns (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        sys.stderr = os.fdopen(w, "w")
        os.environ.update(env)
        import train

        code = train.main(argv)
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_world_size_without_torchrun_is_one_line():
    """Fault: WORLD_SIZE=2 python train.py (no torchrun) ended in a torch traceback."""
    code, err = _env_main({"WORLD_SIZE": "2"}, ["--config", "train.toml"])
    assert code == 2 and "WORLD_SIZE=2 is set but RANK is not: launch with torchrun --nproc_per_node=2" in err
    assert "Traceback" not in err


def test_a_user_error_on_a_lone_nonzero_rank_is_printed():
    """Fault: a stale RANK=1 with a bad config exited 2 with no output at all."""
    code, err = _env_main({"RANK": "1"}, ["--config", "train.toml", "--training.steps=0"])
    assert code == 2 and err.startswith("error: (rank 1) invalid config") and "training.steps must be > 0" in err


# --- round 3: loaders, data, templates ---


def _tampered_hf(hf_dir, out, change):
    """A copy of the HF directory hf_dir whose tensors `change(dict)` edited in place."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = load_file(hf_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    return out


def _fp8(tensors):
    for k in [k for k in tensors if k.endswith("proj.weight") and "layers.0.self_attn" in k]:
        tensors[k] = tensors[k].to(torch.float8_e4m3fn)
        tensors[k.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)


def _int32(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)


def _extra_layer(tensors):
    tensors.update(
        {
            k.replace("layers.0.", "layers.9."): v.clone()
            for k, v in list(tensors.items())
            if k.startswith("model.layers.0.")
        }
    )


def _nan(tensors):
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")


@pytest.mark.parametrize(
    "change,match",
    [
        (_fp8, "FP8-quantized checkpoint .*dequantize it to bfloat16 first"),
        (_int32, "model.norm.weight has dtype I32, not a floating-point weight"),
        (_extra_layer, r"unexpected key\(s\), e.g. \['model.layers.9"),
        (_nan, r"model.layers.1.self_attn.o_proj.weight holds 1 NaN/Inf value"),
    ],
)
def test_the_trainers_sharded_hf_load_checks_what_the_converter_checks(tmp_path, hf_dir, change, match):
    """Fault: initial_load_hf cast FP8 without its scales, took int32, dropped extra layers and NaNs."""
    from moonlight.config import ModelArgs
    from moonlight.model import Moonlight
    from moonlight.parallel.load import load_hf_sharded

    bad = _tampered_hf(hf_dir, tmp_path / "bad", change)
    with torch.device("meta"):
        model = Moonlight(ModelArgs.from_hf_config(hf_dir))
    model.to_empty(device="cpu")
    with pytest.raises(CheckpointError, match=match):
        load_hf_sharded(model, bad)
    with pytest.raises(CheckpointError, match=match):  # the converter and generate's load_hf say the same
        load_hf(bad)


def test_conversions_refuse_to_write_nan_or_an_overflowing_cast(tmp_path, hf_dir, capsys):
    """Fault: hf-to-dcp copied NaN weights and dcp-to-hf --dtype float16 wrote inf, both exiting 0."""
    bad = _tampered_hf(hf_dir, tmp_path / "nan", _nan)
    assert _convert("hf-to-dcp", "--hf", bad, "--out", tmp_path / "dcp_nan") == 2
    assert "o_proj.weight holds 1 NaN/Inf value" in capsys.readouterr().err
    assert not (tmp_path / "dcp_nan").exists()

    big = _tampered_hf(hf_dir, tmp_path / "big", lambda t: t["model.norm.weight"].fill_(1e6))
    convert_main(["hf-to-dcp", "--hf", str(big), "--out", str(tmp_path / "dcp")])
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "dcp", "--out", tmp_path / "fp16", "--dtype", "float16") == 2
    err = capsys.readouterr().err
    assert "model.norm.weight holds NaN/Inf values (finite before the cast to torch.float16" in err, err
    assert not (tmp_path / "fp16").exists() and not list(tmp_path.glob(".tmp-save-*"))
    assert _convert("dcp-to-hf", "--dcp", tmp_path / "dcp", "--out", tmp_path / "o", "--max-shard-size", "0") == 2
    assert "max_shard_size='0' must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_stops_on_non_finite_logits(temperature):
    """Fault: generate on a NaN weight printed token 0 (NUL bytes) and exited 0, or a torch traceback."""
    from moonlight.generate import generate
    from tests.helpers import tiny_args

    model = Moonlight(tiny_args())
    model.init_weights(std=0.1)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"logits are NaN/Inf \(within the first 1 generated tokens\): its weights hold"
    ):
        generate(model, torch.tensor([[3, 4, 5]]), 4, temperature=temperature)


@pytest.mark.parametrize(
    "template,match",
    [
        (
            "{% for i in range(4000) %}{% for j in range(4000) %}{% endfor %}{% endfor %}",  # ~2 s a render
            r"did not render a conversation within 0.2 s \(runaway loops\?\)",
        ),
        (
            "{{ ''.__class__.__mro__ }}",
            r"failed: SecurityError: access to attribute '__class__' of 'str' object is unsafe",
        ),
        ("{{ raise_exception('roles must alternate') }}", "failed: TemplateError: roles must alternate"),
    ],
)
def test_a_hostile_chat_template_ends_in_one_error_naming_its_folder(tmp_path, monkeypatch, template, match):
    """Fault: nested range loops in chat_template rendered for hours; a sandbox refusal was a jinja traceback."""
    from moonlight.data import chat
    from tests.helpers import MULTI_TURN, chat_tiktoken_dir

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.2)
    folder = chat_tiktoken_dir(tmp_path, template)
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"the chat_template of {folder}/tokenizer_config.json {match}"):
        chat.load_chat_template(str(folder), build_tokenizer(str(folder))).encode(MULTI_TURN)
    assert time.monotonic() - start < 10
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_fifo_or_device_in_the_data_folder_is_refused_before_opening(tmp_path):
    """Fault: a FIFO in data.path blocked open() forever; /dev/zero as x.jsonl read until out of memory."""
    from moonlight.data.documents import expand_paths

    (tmp_path / "ok.jsonl").write_text('{"text": "a"}\n')
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(DataError, match=r"fifo.jsonl is not a regular file .* remove it from data.path"):
        expand_paths(str(tmp_path), (".jsonl",), "jsonl")
    os.unlink(tmp_path / "fifo.jsonl")
    os.symlink("/dev/zero", tmp_path / "zero.jsonl")
    for path in (str(tmp_path), str(tmp_path / "zero.jsonl"), str(tmp_path / "z*.jsonl")):
        with pytest.raises(DataError, match=r"zero.jsonl is not a regular file"):
            expand_paths(path, (".jsonl",), "jsonl")
    with pytest.raises(DataError, match=r"zero.jsonl is not a regular file"):
        list(read_jsonl([str(tmp_path / "zero.jsonl")]))


def test_an_overlong_line_is_a_bad_record_read_in_bounded_pieces(tmp_path, monkeypatch):
    """Fault: a line without newlines (a binary or minified file) was read whole, however large."""
    from moonlight.data import documents

    monkeypatch.setattr(documents, "MAX_LINE_BYTES", 64)
    path = tmp_path / "long.jsonl"
    path.write_text('{"text": "a"}\n{"text": "' + "x" * 1000 + '"}\n{"text": "' + "y" * 52 + '"}\n{"text": "b"}')
    bad = documents.BadLines("skip")
    assert list(read_jsonl([str(path)], bad=bad)) == ["a", "y" * 52, "b"]
    assert bad.reported == [f"{path}:2: longer than 64 bytes (not one JSON record per line?)"]


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_out_of_range_is_a_config_error(seed):
    """Fault: training.seed = -1 or 2**64 passed validation and ended in a numpy or torch traceback."""
    with pytest.raises(ConfigError, match=rf"training.seed must be in \[0, 2\*\*64\) \(got {seed}\)"):
        load_config("train.toml", [f"--training.seed={seed}"]).validate()


def test_a_lora_checkpoint_resumed_without_lora_or_on_another_base_names_the_setting(tmp_path):
    """Fault: resuming a LoRA run without lora.enable said "a different model?"; on another base, only a warning."""
    from moonlight.checkpoint.export import export_hf
    from tests.helpers import lora_test_model
    from tests.helpers import lora_cfg as _cfg

    export_hf([lora_test_model(seed=7)], tmp_path / "base")
    export_hf([lora_test_model(seed=8)], tmp_path / "other")
    run = ["--training.steps=2", "--checkpoint.enable=true", "--checkpoint.interval=2"]
    Trainer(_cfg(tmp_path / "run", *run, f"--checkpoint.initial_load_hf={tmp_path / 'base'}")).train()
    more = [*run, "--training.steps=4"]
    with pytest.raises(
        CheckpointError,
        match=r"step-2 is a LoRA/DoRA run's: resume it with lora.enable = true "
        r"\(lora.rank = 4, lora.alpha = 16.0",
    ):
        Trainer(_cfg(tmp_path / "run", *more, "--lora.enable=false"))
    other = f"--checkpoint.initial_load_hf={tmp_path / 'other'}"
    with pytest.raises(
        CheckpointError,
        match=rf"trained on the frozen weights in {tmp_path / 'base'}, not .*other: "
        r"set it to .*checkpoint.other_base = true",
    ):
        Trainer(_cfg(tmp_path / "run", *more, other))
    assert Trainer(_cfg(tmp_path / "run", *more, other, "--checkpoint.other_base=true")).step == 2


def test_a_file_of_mostly_unusable_records_is_an_error_naming_the_cause(tmp_path):
    """Fault: UTF-16, gzip named .jsonl, a wrong text_key or a non-text column trained on almost nothing."""
    from moonlight.data.documents import read_hf

    lines = "".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(12))
    (tmp_path / "utf16.jsonl").write_bytes(lines.encode("utf-16"))
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "ok.jsonl").write_text(lines + "not json\n")
    cases = [
        ("utf16.jsonl", "text", r"utf16.jsonl is UTF-16 \(or binary\), not UTF-8 text: convert it"),
        ("gz.jsonl", "text", r"gz.jsonl is gzip-compressed but not named .gz: rename it to gz.jsonl.gz"),
        (
            "ok.jsonl",
            "body",
            r"ok.jsonl: 13 of 13 records are malformed \(first: .*ok.jsonl:1: missing text "
            r"field 'body' \(keys: text, id\)\); is data.text_key = \"body\" the field",
        ),
    ]
    for name, key, match in cases:
        with pytest.raises(DataError, match=match):
            list(read_jsonl([str(tmp_path / name)], key))
    assert len(list(read_jsonl([str(tmp_path / "ok.jsonl")]))) == 12  # one bad line in 13 is skipped

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(12))}), tmp_path / "ints.parquet")
    with pytest.raises(
        DataError,
        match=r"12 of 12 records are malformed \(first: .*row 1: field 'text': is int, not a "
        r"string\); is data.text_key = \"text\" the column",
    ):
        list(read_hf(str(tmp_path / "ints.parquet")))


def test_too_little_data_after_skipping_names_the_first_skipped_record(tmp_path):
    """Fault: a small file under the wrong text_key ended in "0 tokens ..." without the cause."""
    from moonlight.data.loader import build_dataloader
    from tests.helpers import data_cfg

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": "x" * 50}) + "\n" for _ in range(3)))
    with pytest.raises(
        DataError,
        match=r"0 tokens in 0 documents .* \(3 malformed record\(s\) skipped, first: "
        r".*a.jsonl:1: missing text field 'text' \(keys: body\)\)",
    ):
        build_dataloader(data_cfg(str(tmp_path / "a.jsonl")), build_tokenizer("byte"), 8, 1)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_data_that_is_read_twice_or_has_nothing_to_learn_is_warned_about(tmp_path, caplog):
    """Fault: x.jsonl beside x.jsonl.gz was read twice; all-empty assistant turns trained silently."""
    from moonlight.data.documents import expand_paths
    from moonlight.data.loader import load_documents
    from tests.helpers import chat_cfg
    from tests.helpers import write_chat as _write_chat

    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    caplog.set_level(logging.WARNING)
    assert len(expand_paths(str(tmp_path), (".jsonl", ".jsonl.gz"), "jsonl")) == 2
    assert _warnings(caplog) == [
        f"data: {tmp_path}/x.jsonl and {tmp_path}/x.jsonl.gz are both read (1 such pair(s)): "
        "the same documents twice? Remove one of each pair from data.path"
    ]
    caplog.clear()
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
        for reply in ("", " ", "\n", "yo")
    ]
    load_documents(chat_cfg(_write_chat(tmp_path / "c.jsonl", rows)), build_tokenizer("byte"))
    assert any("3 of 4 conversations in" in m and "have only empty assistant turns" in m for m in _warnings(caplog))


def test_megatron_files_with_eos_appended_or_another_tokenizer_are_warned_about(tmp_path, caplog):
    """Fault: prepare_data --append-eos then add_eos = true doubled every EOS; another tokenizer went unnoticed."""
    from moonlight.data.loader import build_dataloader
    from moonlight.data.megatron import build_megatron_from_jsonl
    from tests.helpers import chat_tiktoken_dir
    from tests.helpers import data_cfg

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(20)))
    byte = build_tokenizer("byte")
    build_megatron_from_jsonl(str(tmp_path / "a.jsonl"), str(tmp_path / "tok"), byte, append_eos=True)
    assert json.loads((tmp_path / "tok.moonlight.json").read_text())["append_eos"] is True
    caplog.set_level(logging.WARNING)
    build_dataloader(data_cfg(tmp_path / "tok", fmt="megatron", add_eos=False), byte, 8, 1)
    assert _warnings(caplog) == []
    build_dataloader(data_cfg(tmp_path / "tok", fmt="megatron", add_eos=True), byte, 8, 1)
    assert _warnings(caplog) == [
        f"data: the documents of {tmp_path / 'tok'} already end with the eos token "
        "(prepare_data --append-eos?) and data.add_eos = true adds another to each: set it "
        "to false"
    ]
    caplog.clear()
    other = build_tokenizer(str(chat_tiktoken_dir(tmp_path, "")))
    build_dataloader(data_cfg(tmp_path / "tok", fmt="megatron", add_eos=False), other, 8, 1)
    assert _warnings(caplog) == [
        f"data: 1 of 1 Megatron file(s) in {tmp_path / 'tok'} were tokenized with another "
        f"tokenizer than data.tokenizer (e.g. {tmp_path / 'tok'}): their token ids mean "
        "other text; run prepare_data again with this tokenizer"
    ]


def test_repeated_epochs_and_validation_on_the_training_data_are_warned_about(caplog):
    """Fault: a run over several epochs of its data, or validating on data.path, said nothing."""
    from moonlight.data.loader import build_dataloader
    from moonlight.train.build import warn_about_data

    cfg = load_config(
        "train.toml", ["--training.steps=100000", "--validation.enable=true", "--validation.path=data/corpus"]
    )
    loader = build_dataloader(cfg.data, build_tokenizer("byte"), cfg.training.seq_len, 4)
    caplog.set_level(logging.WARNING)
    warn_about_data(cfg, loader, build_dataloader(cfg.data, build_tokenizer("byte"), cfg.training.seq_len, 4))
    found = _warnings(caplog)
    assert len(found) == 2 and re.fullmatch(
        rf"data: 100000 steps of 8 sequences read 800000 sequences, [0-9.]+ epochs "
        rf"of the {loader.sequences_per_epoch} in data/corpus: the data repeats",
        found[0],
    ), found
    assert found[1] == (
        "validation: validation.path data/corpus holds the same documents as data.path data/corpus: "
        "the validation loss is a training loss, not a held-out one"
    )


def test_a_run_from_an_hf_checkpoint_with_a_nan_weight_stops_before_training(tmp_path):
    """Fault: checkpoint.initial_load_hf with a NaN weight trained nothing (every step skipped) and exited 0."""
    make_hf_model("moonlight", seed=0, dtype=torch.float32, vocab_size=272).save_pretrained(tmp_path / "hf")
    bad = _tampered_hf(tmp_path / "hf", tmp_path / "bad", _nan)
    with pytest.raises(CheckpointError, match=r"bad: model.layers.1.self_attn.o_proj.weight holds 1 NaN/Inf value"):
        _trainer(tmp_path / "run", f"--checkpoint.initial_load_hf={bad}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
