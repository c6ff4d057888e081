"""benchmarks/gpu_suite.sh --cpu-smoke runs every step of the GPU suite with tiny shapes on CPU and writes
the JSON and markdown summaries with each step's figures; on a GPU the report's step limits fit 8 minutes."""

import json
import os
import re
import subprocess
import time

import pytest
from tests.helpers import ROOT


@pytest.mark.slow
def test_cpu_smoke_writes_the_summary(tmp_path):
    steps = "kernel_tests kernel_bench slice trainer moe lora generate"  # generate runs only when named
    env = {**os.environ, "OUT": str(tmp_path), "STEPS": steps}
    run = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = summary["steps"]
    for name in ("kernel_tests", "kernel_bench", "slice", "trainer", "moe", "lora"):
        assert steps[f"{name}_status"]["exit_code"] == 0, name
    correctness, rope = steps["kernel_bench"]
    assert correctness == {"cpu_correctness_pass": True}
    assert rope["op"] == "mla rope cpu" and rope["time_copying_over_fused_median"] > 0
    assert rope["allocated_bytes"]["copying"] > rope["allocated_bytes"]["fused"] > 0
    runs = steps["slice"]["runs"]
    assert {"ours eager", "ours compiled (aot_eager)", "torchtitan eager"} <= set(runs)
    for name in ("ours eager", "ours compiled (aot_eager)"):
        assert runs[name]["tokens_per_s"] > 0 and 0 < runs[name]["mfu_pct"] < 100, runs[name]
    assert steps["slice"]["flops_per_step"] > 0 and steps["slice"]["peak_flops"] > 0
    for optimizer in ("muon", "adamw"):  # the trainer's own step, 2 micro-batches in the smoke (16 on a GPU)
        run = steps["trainer"][optimizer]
        assert run["optimizer"] == optimizer and run["micro_batches"] == 2, run
        assert 0 < run["optimizer_s"] < run["step_s"] and 0 < run["outside_forward_backward_pct"] < 100, run
        assert 0 < run["mfu_pct"] < 100, run
    layer, profile = steps["moe"]["moe_layer"], steps["moe"]["slice_profile"]
    assert {"router", "permute", "experts", "unpermute", "shared", "whole_layer"} <= set(layer)
    assert layer["layer_over_expert_gemms"] == round(layer["whole_layer"] / layer["experts"], 3)
    assert profile["kernels_per_step"] > 0 and profile["top"][0]["ms_per_step"] > 0
    assert steps["lora"]["tokens_per_s"] > 0 and steps["lora"]["peak_memory_gib"] > 0
    assert steps["generate_status"]["exit_code"] == 0
    runs = steps["generate"]["runs"]
    for b in (1, 2):  # the compiled decode step, transformers' generate and our eager loop, same weights
        for name in (f"ours compiled batch {b}", f"ours eager batch {b}"):
            assert runs[name]["tokens_per_s"] > 0, runs
        assert runs[f"transformers batch {b}"]["greedy_tokens_agree"] == 1.0, runs
    assert 0 < runs["prefill 64 eager"]["mfu_pct"] < 100 and 0 < runs["prefill 64 compiled per block"]["mfu_pct"] < 100
    assert (tmp_path / "gpu_suite.md").read_text().startswith("# GPU suite summary")


def test_slice_step_keeps_the_runs_finished_before_it_is_stopped(tmp_path, monkeypatch):
    """gpu_suite.sh stops a step at its time limit: the slice's JSON is written after every system,
    so the eager run survives a compile that never ends (here: interrupted)."""
    from benchmarks import gpu_suite

    def build(args, device, dtype, tokens, compile_backend):
        if compile_backend:
            raise KeyboardInterrupt  # what no `except Exception` catches, as a kill
        return lambda: time.sleep(0.001)

    monkeypatch.setattr(gpu_suite, "our_train_step", build)
    monkeypatch.setattr(gpu_suite, "device_peak", lambda device: (1e12, "test"))
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.run_slice(tmp_path, smoke=True)
    runs = json.loads((tmp_path / "step_slice.json").read_text())["runs"]
    assert runs["ours eager"]["step_s"] > 0 and not any(name.startswith("ours compiled") for name in runs)


def test_the_report_fits_in_eight_minutes_on_a_gpu(tmp_path):
    """gpu_suite.sh as a GPU machine runs it (no --cpu-smoke, no STEPS): every step of the report, and
    their time limits add up to at most 480 s. `timeout` and `python` are stand-ins that run nothing."""
    for tool in ("timeout", "python"):
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "STEPS"}
    env.update(OUT=str(tmp_path / "out"), PATH=f"{tmp_path}:{os.environ['PATH']}")
    run = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    limits = {name: int(s) for name, s in re.findall(r"^== (\w+) \(limit (\d+)s\)$", run.stdout, re.M)}
    assert set(limits) == {"kernel_tests", "kernel_bench", "slice", "trainer", "moe", "lora"}, run.stdout
    assert sum(limits.values()) <= 480, limits
