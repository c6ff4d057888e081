"""Every Triton kernel compiles for NVIDIA A100 (sm_80) and H100/H200 (sm_90) with real Triton and
ptxas, ahead of time on this CPU machine (tests/kernel_compile.py says how).

The numerics tests run the kernels under TRITON_INTERPRET=1, which executes their Python body and
never lowers them: a kernel wrong only for the compiler (a shape or block that must be a
compile-time power of 2, a type the backend refuses, too many resources) would otherwise fail first
on a GPU. Runs in a child process without the interpreter, which patches `triton.language` for the
whole process it runs in."""

import json
import os
import subprocess
import sys

import pytest
from tests.helpers import ROOT


def test_every_triton_kernel_compiles_for_a100_and_hopper(tmp_path):
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compiled from scratch, nothing left in ~/.triton
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # every kernel was launched by the public ops (forward, backward, with and without routing weights)
    assert report["kernels"] == [
        "_combine_rows_kernel",
        "_expand_rows_kernel",
        "_mla_rope_key_backward_kernel",
        "_mla_rope_key_kernel",
        "_rms_norm_bwd_kernel",
        "_rms_norm_fwd_kernel",
        "_rotate_rope_kernel",
        "_route_bwd_kernel",
        "_route_fwd_kernel",
    ], (triton.__version__, report)
    # per target: bf16 and fp32, shared and per-token RoPE angles, both directions, padded and unpadded groups
    assert report["compiled"]["sm_80"] == report["compiled"]["sm_90"] >= 16, report
