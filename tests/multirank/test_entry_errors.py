"""User errors at `torchrun --nproc_per_node=2 train.py`: degrees that do not fit the world, a data file
that is missing, and a checkpoint saved for another model. Each is one `error: ...` line from rank 0,
the workers exit with code 2, and no traceback of ours is printed; a data warning is printed once.

torchrun itself then reports the failed workers (its own ChildFailedError summary, exit code 1):
that report comes from the launcher, which no worker can change; it names exitcode 2 per rank."""

import re
import sys

import pytest
from tests.helpers import entry_errors_run


def _torchrun(tmp_path, *overrides):
    return entry_errors_run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path, *overrides
    )


def _assert_one_line(proc, *fragments):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(f in errors[0] for f in fragments), errors[0]
    ours = [
        line
        for line in proc.stderr.splitlines()
        if line.strip().startswith("File ") and ("train.py" in line or "/moonlight/" in line)
    ]
    assert not ours, proc.stderr[-3000:]  # no traceback from our code, on any rank
    assert proc.returncode != 0
    # torchrun's table of failed workers: ours exit 2; one the agent stopped after that shows -15 (SIGTERM)
    codes = re.findall(r"exitcode\s+:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]


@pytest.mark.slow
def test_degrees_that_do_not_fit_the_world(tmp_path):
    proc = _torchrun(tmp_path, "--parallelism.tp=4")
    _assert_one_line(proc, "error: ", "tp(4)", "world_size=2")


@pytest.mark.slow
def test_missing_data_file(tmp_path):
    proc = _torchrun(tmp_path, f"--data.path={tmp_path}/missing.jsonl")
    _assert_one_line(proc, "error: data.path", "missing.jsonl")


@pytest.mark.slow
def test_checkpoint_saved_for_another_model(tmp_path):
    single = entry_errors_run([sys.executable], tmp_path, "--checkpoint.interval=1")
    assert single.returncode == 0, single.stderr[-3000:]
    proc = _torchrun(tmp_path, "--model.overrides.num_hidden_layers=3")
    _assert_one_line(proc, "error: checkpoint step-2", "different model", "num_hidden_layers=4")


@pytest.mark.slow
def test_data_warnings_are_printed_once_under_torchrun(tmp_path):
    """Every rank reads the same data and meets the same malformed record: one warning, not one per rank."""
    data = tmp_path / "data.jsonl"
    data.write_text("not json\n" + "".join(f'{{"text": "document {i} with some words in it"}}\n' for i in range(200)))
    proc = _torchrun(tmp_path, f"--data.path={data}", "--checkpoint.enable=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("data: skipping malformed record") == 1, proc.stderr[-3000:]
