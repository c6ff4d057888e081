"""ruff's lint (pyflakes, bugbear, pep8-naming, line length; configured in pyproject.toml) is clean."""

import pathlib
import shutil
import subprocess
import sys
from tests.helpers import ROOT



def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
    out = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
