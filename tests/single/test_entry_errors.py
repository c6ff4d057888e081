"""User errors at `python train.py`: one `error: ...` line and exit code 2, no traceback (unless
MOONLIGHT_TRACEBACK asks for one); `--help` prints the usage and trains nothing."""

import os
import subprocess
import sys

from tests.helpers import ROOT, entry_errors_run


def test_single_process_user_error_is_one_line_and_exit_2(tmp_path):
    proc = entry_errors_run([sys.executable], tmp_path, f"--data.path={tmp_path}/missing.jsonl")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data.path")
    assert "Traceback" not in proc.stderr
    env_proc = subprocess.run(
        [sys.executable, "train.py", "--config", "train.toml", f"--data.path={tmp_path}/x"],
        cwd=ROOT,
        env=dict(os.environ, MOONLIGHT_TRACEBACK="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" in env_proc.stderr and "DataError" in env_proc.stderr  # the debugging switch


def test_help_prints_the_usage_and_trains_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "train.toml", f"--job.dump_folder={tmp_path}/run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert "train.py --config" in proc.stdout and "lr_scheduler" in proc.stdout, proc.stdout
    assert not (tmp_path / "run").exists()
