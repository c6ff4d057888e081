"""Streamed conversion and export hold one output shard plus one tensor, not the model: peak memory of
`python -m moonlight.convert` (both directions) and of the trainer's `export_hf`, measured in a fresh
process on a ~100 MB fp32 model with 10 MB shards, against the whole-model (non-streamed) reference,
whose output the streamed one must equal byte for byte.

Memory is the process's resident ANONYMOUS memory (RssAnon), sampled every millisecond: the safetensors
inputs are memory-mapped, and their clean file pages are page cache, not memory the converter holds.
Bound: growth < half the model (measured: about a quarter to a third of it for the streamed paths,
over the whole model for the reference).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from moonlight.checkpoint.format import dcp_load
from moonlight.config import ModelArgs
from moonlight.hf import expected_shapes, save_hf
from moonlight.model import Moonlight
from tests.helpers import ROOT

SHARD = "10MB"
# ~100 MB in fp32: 7 MoE layers of 16 experts; the largest tensor (an expert stack) is 4 MB
ARGS = ModelArgs.preset(
    "debug",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    n_routed_experts=16,
    kernels="torch",
)

_MEASURE = r"""
import json, sys, threading, time
import torch
from moonlight.checkpoint.export import export_hf, load_dcp_model
from moonlight.convert import main
from moonlight.hf import load_hf, save_hf

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

mode, src, out, shard = sys.argv[1:]
model = load_hf(src, kernels="torch") if mode == "export" else None  # the live model is not the export's
base, peak, done = anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
if mode == "hf-to-dcp":
    main(["hf-to-dcp", "--hf", src, "--out", out])
elif mode == "dcp-to-hf":
    main(["dcp-to-hf", "--dcp", src, "--out", out, "--max-shard-size", shard])
elif mode == "reference":  # the whole model in memory, then written
    save_hf(load_dcp_model(src), out, max_shard_size=shard)
elif mode == "export":
    export_hf([model], out, dtype=torch.float32, max_shard_size=shard)
done.set()
sampler.join()
print(json.dumps({"growth": max(peak[0], anon()) - base}))
"""


def _peak_growth(mode, src, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(src), str(out), SHARD],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])["growth"]


def _files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssAnon is read from Linux /proc")
def test_streamed_conversion_and_export_hold_a_shard_not_the_model(tmp_path):
    torch.manual_seed(0)
    model = Moonlight(ARGS)
    model.init_weights()
    sd = model.state_dict()
    model_bytes = sum(math.prod(s) * 4 for s in expected_shapes(ARGS).values())
    assert model_bytes > 8 * 10**7  # several times the 10 MB shards
    src = tmp_path / "src"
    save_hf(model, src, max_shard_size=SHARD)
    bound = model_bytes // 2

    # hf-to-dcp: streamed, and every tensor arrives bit-exact
    grew = {"hf-to-dcp": _peak_growth("hf-to-dcp", src, tmp_path / "dcp")}
    back = {f"model.{k}": torch.empty_like(v) for k, v in sd.items()}
    dcp_load(back, str(tmp_path / "dcp"))
    for k, v in sd.items():
        assert back[f"model.{k}"].dtype == v.dtype and torch.equal(back[f"model.{k}"], v), k

    # dcp-to-hf: streamed against the whole-model reference, byte for byte
    grew["dcp-to-hf"] = _peak_growth("dcp-to-hf", tmp_path / "dcp", tmp_path / "streamed")
    grew["reference"] = _peak_growth("reference", tmp_path / "dcp", tmp_path / "reference")
    streamed, reference = _files(tmp_path / "streamed"), _files(tmp_path / "reference")
    assert len(streamed) > 8 and streamed == reference
    assert _files(src) == reference  # and the round trip returns the source files

    # the trainer's export (one process): gathered tensor by tensor, same bytes
    grew["export"] = _peak_growth("export", src, tmp_path / "export")
    assert _files(tmp_path / "export") == reference

    mb = {k: round(v / 1e6, 1) for k, v in grew.items()}
    print(f"model {model_bytes / 1e6:.1f} MB, shards {SHARD}: peak RSS growth (MB) {mb}")
    assert grew["reference"] > model_bytes, mb  # the measurement sees a whole model when one is held
    for mode in ("hf-to-dcp", "dcp-to-hf", "export"):
        assert grew[mode] < bound, (mode, mb)
