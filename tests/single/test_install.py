"""The package as users install it, used from any directory next to transformers >= 5.25 (which
imports PyPI's `kernels`): every entry point's --help and the converter's imports, run outside the
repository with PYTHONPATH removed; the wheel's only top-level package is `moonlight`, no other
installed distribution provides it, and the wheel installed on its own imports the same way."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from tests.helpers import ROOT

MODULES = ("moonlight.convert", "moonlight.generate", "moonlight.plan", "moonlight.prepare_data")

# Imports everything in one process, as the converter's users do, then runs each command line's
# --help the way `python -m` and `python train.py` do (runpy); prints what it found as JSON.
_PROBE = r"""
import contextlib, importlib, importlib.metadata, io, json, runpy, sys, warnings
import moonlight, moonlight.kernels
for name in sys.argv[2:]:
    importlib.import_module(name)
from transformers import DeepseekV3ForCausalLM
try:
    importlib.metadata.distribution("kernels")
    import kernels
    pypi_kernels = kernels.__file__
except importlib.metadata.PackageNotFoundError:
    pypi_kernels = None
helps = {}
for cmd in sys.argv[2:] + [sys.argv[1]]:
    out, code = io.StringIO(), None
    sys.argv = [cmd, "--help"]
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported above
        try:
            runpy.run_path(cmd, run_name="__main__") if cmd.endswith(".py") else runpy.run_module(
                cmd, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    helps[cmd] = [code, out.getvalue()]
print(json.dumps({"moonlight": moonlight.__file__, "kernels": list(moonlight.kernels.__path__),
                  "transformers": DeepseekV3ForCausalLM.__module__, "pypi_kernels": pypi_kernels,
                  "helps": helps}))
"""


def _env(pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _probe(cwd, pythonpath: str | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT / "train.py"), *MODULES],
        cwd=cwd,
        env=_env(pythonpath),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _check(found: dict, package_dir: pathlib.Path):
    assert pathlib.Path(found["moonlight"]).resolve() == (package_dir / "__init__.py").resolve()
    assert [pathlib.Path(p).resolve() for p in found["kernels"]] == [(package_dir / "kernels").resolve()]
    assert found["transformers"].startswith("transformers.")
    if found["pypi_kernels"] is not None:  # PyPI's kernels (transformers' dependency) is not ours
        ours = {(ROOT / "kernels").resolve(), (package_dir / "kernels").resolve()}
        assert pathlib.Path(found["pypi_kernels"]).resolve().parent not in ours
        assert (
            pathlib.Path(found["pypi_kernels"]).resolve()
            == pathlib.Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
        )
    usage = {**{m: f"usage: python -m {m} [-h]" for m in MODULES}, str(ROOT / "train.py"): "train.py --config"}
    assert {cmd: code for cmd, (code, _) in found["helps"].items()} == dict.fromkeys(usage, 0)
    for cmd, (_, out) in found["helps"].items():
        assert usage[cmd] in out, (cmd, out[:300])


@pytest.mark.floor  # every entry point imports on torch 2.11 too
@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_installed_package_imports_and_runs_from_any_directory(where, tmp_path):
    """The installed package (`pip install -e .` as the README says) with PYTHONPATH unset."""
    cwd = tmp_path if where == "elsewhere" else ROOT
    find = "import importlib.util as u; s = u.find_spec('moonlight'); print(s.origin if s else '')"
    spec = subprocess.run(
        [sys.executable, "-c", find], cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True
    ).stdout.strip()
    if not spec or pathlib.Path(spec).resolve() != (ROOT / "moonlight" / "__init__.py").resolve():
        message = f"moonlight is installed from {spec or 'nowhere'}, not this checkout: pip install -e {ROOT}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs this checkout: the README's command must have
        pytest.skip(message)
    _check(_probe(cwd), ROOT / "moonlight")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel `pip wheel` builds from a copy of the checkout (a build writes into its source tree)."""
    src = tmp_path_factory.mktemp("src") / "moonlight"
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", "dist", "outputs", ".pytest_cache", ".ruff_cache", ".gl"
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(src)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("moonlight-*.whl")
    return built


def test_wheel_top_level_is_moonlight_alone(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = set(z.read(top_level).decode().split())
    files = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert declared == files == {"moonlight"}
    assert any(n.startswith("moonlight/kernels/") and n.endswith(".py") for n in names)
    providers = importlib.metadata.packages_distributions()
    assert {name: set(providers.get(name, [])) - {"moonlight"} for name in files} == {n: set() for n in files}


def test_wheel_installed_alone_imports_from_any_directory(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    _check(_probe(work, pythonpath=str(target)), target / "moonlight")
