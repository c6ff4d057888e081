"""benchmarks/gpu_step_checks.py runs every measurement at tiny sizes on CPU and prints its JSON."""

import json
import subprocess
import sys


def test_cpu_smoke_prints_every_measurement():
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_step_checks.py", "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result) == {"device", "syncs_per_microbatch", "sdpa", "moe_breakdown", "ac_step"}
    assert result["syncs_per_microbatch"]["count"] == 0  # no host sync in a micro-batch without EP
    assert {"qk192_v192/default", "qk192_v128/default"} <= set(result["sdpa"])
    assert {"router", "permute", "experts", "unpermute", "shared", "whole_layer"} <= set(result["moe_breakdown"])
    assert set(result["ac_step"]) == {f"{mode}/mbs{b}" for mode in ("none", "selective", "full", "op") for b in (1, 2)}
    assert all(v["step_s"] > 0 for v in result["ac_step"].values())
