"""User errors at the entry points: `torchrun --nproc_per_node=2 train.py` meets a layout that does not
fit the world, a data file that is missing, and a checkpoint saved for another model. Each is one
`error: ...` line from rank 0, the workers exit with code 2, and no traceback of ours is printed.

torchrun itself then reports the failed workers (its own ChildFailedError summary, exit code 1):
that report comes from the launcher, which no worker can change; it names exitcode 2 per rank."""

import json
import os
import re
import subprocess
import sys

import pytest

from moonlight.errors import DataError, exit_on_user_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--training.steps=2", "--lr_scheduler.warmup_steps=0", "--training.seq_len=32",
         "--training.global_batch_size=2", "--training.local_batch_size=1", "--metrics.device_peak_flops=1e11"]


def _run(cmd, tmp_path, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOONLIGHT_TRACEBACK", None)
    return subprocess.run(cmd + ["train.py", "--config", "train.toml", f"--job.dump_folder={tmp_path}", *QUICK,
                                 *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _torchrun(tmp_path, *overrides):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                tmp_path, *overrides)


def _assert_one_line(proc, *fragments):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(f in errors[0] for f in fragments), errors[0]
    ours = [line for line in proc.stderr.splitlines()
            if line.strip().startswith("File ") and ("train.py" in line or "/moonlight/" in line)]
    assert not ours, proc.stderr[-3000:]  # no traceback from our code, on any rank
    assert proc.returncode != 0
    # torchrun's table of failed workers: ours exit 2; one the agent stopped after that shows -15 (SIGTERM)
    codes = re.findall(r"exitcode\s+:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]


@pytest.mark.slow
def test_layout_that_does_not_fit_the_world(tmp_path):
    proc = _torchrun(tmp_path, "--parallelism.tp=4")
    _assert_one_line(proc, "error: ", "tp(4)", "world_size=2")


@pytest.mark.slow
def test_missing_data_file(tmp_path):
    proc = _torchrun(tmp_path, f"--data.path={tmp_path}/missing.jsonl")
    _assert_one_line(proc, "error: data.path", "missing.jsonl")


@pytest.mark.slow
def test_checkpoint_saved_for_another_model(tmp_path):
    single = _run([sys.executable], tmp_path, "--checkpoint.interval=1")
    assert single.returncode == 0, single.stderr[-3000:]
    proc = _torchrun(tmp_path, "--model.overrides.num_hidden_layers=3")
    _assert_one_line(proc, "error: checkpoint step-2", "different model", "num_hidden_layers=4")


def test_single_process_user_error_is_one_line_and_exit_2(tmp_path):
    proc = _run([sys.executable], tmp_path, f"--data.path={tmp_path}/missing.jsonl")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data.path")
    assert "Traceback" not in proc.stderr
    env_proc = subprocess.run([sys.executable, "train.py", "--config", "train.toml", f"--data.path={tmp_path}/x"],
                              cwd=REPO, env=dict(os.environ, MOONLIGHT_TRACEBACK="1"), capture_output=True,
                              text=True, timeout=300)
    assert "Traceback" in env_proc.stderr and "DataError" in env_proc.stderr  # the debugging switch


def test_help_prints_the_usage_and_trains_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config", "train.toml", f"--job.dump_folder={tmp_path}/run",
                           "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert "train.py --config" in proc.stdout and "lr_scheduler" in proc.stdout, proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_data_warnings_are_printed_once_under_torchrun(tmp_path):
    """Every rank reads the same data and meets the same malformed record: one warning, not one per rank."""
    data = tmp_path / "data.jsonl"
    data.write_text("not json\n" + "".join(f'{{"text": "document {i} with some words in it"}}\n' for i in range(200)))
    proc = _torchrun(tmp_path, f"--data.path={data}", "--checkpoint.enable=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("data: skipping malformed record") == 1, proc.stderr[-3000:]


def _fail():
    raise DataError("data.path = /node2/x.jsonl does not exist:\n  point it at a file")


@pytest.mark.parametrize("torchrun", [False, True])
def test_an_error_met_on_another_rank_alone_is_reported(tmp_path, monkeypatch, capsys, torchrun):
    """Rank 1 alone meets the error (its node lacks the data): the message must reach the user, through
    torchrun's failure summary (the rank's error file) or, without torchrun, on stderr with the rank."""
    monkeypatch.delenv("MOONLIGHT_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "1")
    error_file = tmp_path / "error.json"
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    else:
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert exit_on_user_error(_fail) == 2
    expected = "error: data.path = /node2/x.jsonl does not exist: point it at a file"
    stderr = capsys.readouterr().err
    if torchrun:
        assert json.loads(error_file.read_text())["message"] == expected and stderr == ""
    else:
        assert stderr == f"[rank 1] {expected}\n"


def test_rank_0_prints_the_error_once_and_hands_it_to_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MOONLIGHT_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert exit_on_user_error(_fail) == 2
    line = "error: data.path = /node2/x.jsonl does not exist: point it at a file"
    assert capsys.readouterr().err == line + "\n"
    assert json.loads((tmp_path / "error.json").read_text())["message"] == line
