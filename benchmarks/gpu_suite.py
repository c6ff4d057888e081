"""The model steps of benchmarks/gpu_suite.sh; each writes one JSON file into the results folder.

    python benchmarks/gpu_suite.py slice|trainer|moe|lora|generate|summary --out DIR [--cpu-smoke]

slice     a bf16 training step (forward, backward, AdamW step) of a Moonlight-width slice: hidden
          2048, 16 heads, kv_lora 512, 64 experts top-6, 2 shared, one dense + three MoE layers, seq 4096;
          eager and compiled; MFU against the device's dense bf16 spec peak; torchtitan's DeepSeek-V3
          model on the same slice when it imports (benchmarks/peers.py).
trainer   the trainer's own step (benchmarks/train_step.py) on the same slice, pretrain recipe (fp32
          weights, bf16 compute, AC off), 16 micro-batches of 1 x 4096 per optimizer step, with Muon and
          with AdamW: MFU, optimizer ms, share of the step outside forward+backward.
moe       one MoE layer of Moonlight's width at 4096 tokens, forward + backward piece by piece (router,
          permute, experts, unpermute, shared, whole layer; the layer over its expert GEMMs), and the
          profiler's top kernels of one eager slice step (device time, calls, kernels per step,
          device busy share of the profiled wall time).
lora      one GPU, Moonlight-16B with LoRA (configs/moonlight-16b-lora.toml through the trainer):
          peak memory and tokens/s.
generate  Moonlight-16B greedy tokens/s at batch 1 and 16 (compiled decode step; transformers' generate
          and our eager loop on the same weights), prefill MFU of a 4096-token prompt (benchmarks/generate.py).
summary   merges the step files (and the kernel benchmark's) into gpu_suite.json and gpu_suite.md.
--cpu-smoke runs the same code on CPU with tiny shapes and fp32, so the suite is known to work.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/kernels.py would shadow the `kernels` package

import torch  # noqa: E402

from moonlight.config import ModelArgs  # noqa: E402
from moonlight.model import Moonlight  # noqa: E402
from moonlight.parallel.tensor import cross_entropy_loss  # noqa: E402
from moonlight.parallel.compile import apply_compile  # noqa: E402
from moonlight.train.metrics import measure_peak_flops, spec_peak_flops  # noqa: E402
from moonlight.train.optim import build_optimizers  # noqa: E402


def device_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where it came from): the trainer's MFU denominator (spec dense bf16 peak by device
    name), else a measured matmul."""
    if device.type == "cuda":
        spec = spec_peak_flops(torch.cuda.get_device_name(device), torch.bfloat16)
        if spec is not None:
            return spec, "spec dense bf16 peak"
    return measure_peak_flops(device), "measured 2048^3 matmul (no spec peak for this device)"


def slice_args(smoke: bool) -> tuple[ModelArgs, int, int]:
    """(model args, batch, seq) of the benchmark slice."""
    if smoke:
        return ModelArgs.preset("debug", num_hidden_layers=4, first_k_dense_replace=1, kernels="auto"), 2, 64
    return ModelArgs.preset("moonlight-16b-a3b", num_hidden_layers=4, first_k_dense_replace=1), 1, 4096


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def random_moonlight(args: ModelArgs, device, dtype) -> Moonlight:
    """A Moonlight with `init_weights`' random weights (seed 0), built on the meta device and
    materialized on `device` in `dtype`."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Moonlight(args)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype)


def our_train_step(args: ModelArgs, device, dtype, tokens, compile_backend: str | None):
    model = random_moonlight(args, device, dtype).train()
    if compile_backend:
        apply_compile(model, compile_backend)
    # AdamW, as the torchtitan side runs, so the two steps do the same work (Muon's cost: train_step.py)
    optimizers = build_optimizers(list(model.named_parameters()), name="adamw", lr=1e-4)

    def step():
        optimizers.zero_grad()
        cross_entropy_loss(model(tokens), tokens).backward()
        optimizers.step()

    return step


def run_slice(out: Path, smoke: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    args, batch, seq = slice_args(smoke)
    peak, peak_source = device_peak(device)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    flops = args.flops_per_token(seq) * tokens.numel()
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "seq": seq,
        "peak_flops": peak,
        "peak_source": peak_source,
        "flops_per_step": flops,
        "runs": {},
    }
    backend = "aot_eager" if smoke else "inductor"  # smoke: no C++/Triton codegen, the same tracing
    candidates = {
        "ours eager": lambda: our_train_step(args, device, dtype, tokens, None),
        f"ours compiled ({backend})": lambda: our_train_step(args, device, dtype, tokens, backend),
    }
    try:
        from benchmarks.peers import torchtitan_train_step  # torchtitan is in the [bench] extra

        candidates["torchtitan eager"] = lambda: torchtitan_train_step(args, device, dtype, tokens)
    except ImportError as e:
        result["runs"]["torchtitan eager"] = {"skipped": f"not importable: {e}"}
    for name, build in candidates.items():
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = time_steps(build(), device, warmup=1 if smoke else 2, steps=1 if smoke else 5)
            median = statistics.median(times)
            run = {"step_s": median, "tokens_per_s": tokens.numel() / median, "mfu_pct": 100 * flops / median / peak}
            if device.type == "cuda":
                run["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as e:  # a peer that fails here is reported, the suite goes on
            run = {"error": f"{type(e).__name__}: {e}"[:500]}
        result["runs"][name] = run
        print(f"slice {name}: {run}", flush=True)
        write_step(out, "slice", result)  # a step stopped by its time limit keeps the runs it finished
    return result


def run_trainer(out: Path, smoke: bool) -> dict:
    from benchmarks.train_step import measure

    overrides = [
        "--validation.enable=false",
        "--checkpoint.initial_load_hf=",
        "--data.format=jsonl",
        "--data.path=data/corpus",
        "--data.tokenizer=byte",
        "--data.add_eos=true",
        "--parallelism.ep=1",
        "--parallelism.dp_shard=1",
        "--activation_checkpoint.mode=none",
        "--metrics.enable_tensorboard=false",
        "--metrics.log_freq=1000",
        "--training.local_batch_size=1",
    ]
    if smoke:  # fp32, and 2 micro-batches
        overrides += [
            "--model.name=debug",
            "--training.seq_len=32",
            "--training.mixed_precision_param=float32",
            "--training.global_batch_size=2",
        ]
    else:
        overrides += [
            "--model.overrides.num_hidden_layers=4",
            "--model.overrides.first_k_dense_replace=1",
            "--training.seq_len=4096",
            "--training.global_batch_size=16",
        ]
    result = {}
    for optimizer in ("muon", "adamw"):
        try:
            run = measure(
                str(ROOT / "configs" / "moonlight-16b-pretrain.toml"),
                overrides + [f"--optimizer.name={optimizer}"],
                steps=1 if smoke else 3,
                warmup=1,
            )
        except Exception as e:  # the other optimizer still runs
            run = {"error": f"{type(e).__name__}: {e}"[:500]}
        result[optimizer] = run
        print(f"trainer {optimizer}: {run}", flush=True)
        write_step(out, "trainer", result)  # a step stopped by its time limit keeps the runs it finished
    return result


def top_kernels(step, device, steps: int = 2, top: int = 25) -> dict:
    """The profiler's heaviest kernels (CPU ops on a CPU) of `steps` calls of step(), per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()  # warm-up: lazy init, allocator
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [
        e
        for e in prof.key_averages()
        if getattr(e, attr, 0) > 0 and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)
    ]
    events.sort(key=lambda e: -getattr(e, attr))
    total_us = sum(getattr(e, attr) for e in events)
    return {
        "device_ms_per_step": total_us / steps / 1e3,
        "wall_ms_per_step": wall / steps * 1e3,
        # kernels overlap little on one stream: busy ~ kernel time over wall time (profiler included)
        "busy_pct": 100 * total_us / 1e6 / wall,
        "kernels_per_step": sum(e.count for e in events) / steps,
        "top": [
            {
                "name": e.key[:100],
                "ms_per_step": round(getattr(e, attr) / steps / 1e3, 3),
                "pct": round(100 * getattr(e, attr) / total_us, 2),
                "calls_per_step": e.count / steps,
            }
            for e in events[:top]
        ],
    }


def run_moe(out: Path, smoke: bool) -> dict:
    from benchmarks.gpu_step_checks import moe_breakdown

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    args, batch, seq = slice_args(smoke)
    result = {"moe_layer": moe_breakdown(args, device, dtype, tokens=64 if smoke else 4096, repeats=1 if smoke else 5)}
    layer = result["moe_layer"]
    layer["layer_over_expert_gemms"] = round(layer["whole_layer"] / layer["experts"], 3)
    print(f"moe layer: {layer}", flush=True)
    write_step(out, "moe", result)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), device=device)
    result["slice_profile"] = top_kernels(
        our_train_step(args, device, dtype, tokens, None), device, steps=1 if smoke else 2
    )
    print(f"slice profile: {json.dumps(result['slice_profile'])[:2000]}", flush=True)
    return result


def run_lora(out: Path, smoke: bool) -> dict:
    from moonlight.train.config import load_config
    from moonlight.train.trainer import Trainer

    overrides = [
        "--training.steps=4",
        "--checkpoint.enable=false",
        "--checkpoint.initial_load_hf=",
        "--validation.enable=false",
        "--lora.export_adapter=",
        "--model.hf_config=",
        "--data.format=jsonl",
        "--data.path=data/corpus",
        "--data.tokenizer=byte",
        "--lr_scheduler.warmup_steps=1",
        "--metrics.log_freq=1",
        "--training.global_batch_size=1",
        "--training.local_batch_size=1",
        "--parallelism.dp_shard=1",
    ]
    if smoke:
        overrides += [
            "--model.name=debug",
            "--training.seq_len=64",
            "--training.dtype=float32",
            "--training.mixed_precision_param=float32",
            "--training.mixed_precision_reduce=float32",
        ]
    else:
        overrides += ["--training.seq_len=4096", "--training.dtype=bfloat16"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(str(ROOT / "configs" / "moonlight-16b-lora.toml"), [f"--job.dump_folder={tmp}", *overrides])
        trainer = Trainer(cfg)
        values = []
        for _ in range(cfg.training.steps):
            values.append(trainer.train_step())
            trainer.step += 1
    measured = values[1:]  # the first step warms up
    result = {
        "model": cfg.model.name,
        "seq": cfg.training.seq_len,
        "tokens_per_s": statistics.median(v["tokens_per_s"] for v in measured),
        "peak_memory_gib": max(v["memory_gib"] for v in measured),
        "loss_first_last": [values[0]["loss"], values[-1]["loss"]],
    }
    print(f"lora: {result}", flush=True)
    return result


def run_generate(out: Path, smoke: bool) -> dict:
    """benchmarks/generate.py's measurements: Moonlight-16B (random weights, bf16, greedy, prompt 16, 128 new
    tokens) at batch 1 and 16, compiled, beside transformers' generate and our eager loop; prefill MFU."""
    from benchmarks.generate import run  # imports this module

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if smoke:
        args, dtype = ModelArgs.preset("debug", kernels="auto"), torch.float32
        sizes = dict(batches=[1, 2], prompt=16, new=8, baseline_new=4, prefill_len=64, backend="aot_eager")
    else:
        args, dtype = ModelArgs.preset("moonlight-16b-a3b"), torch.bfloat16
        sizes = dict(batches=[1, 16], prompt=16, new=128, baseline_new=32, prefill_len=4096, backend="inductor")
    result = {"model": "debug" if smoke else "moonlight-16b-a3b"}
    try:
        model = random_moonlight(args, device, dtype).eval()
        result.update(run(model, **sizes, report=lambda r: write_step(out, "generate", {**result, **r})))
    except Exception as e:  # the failure becomes this step's result, beside what was measured
        result["error"] = f"{type(e).__name__}: {e}"[:500]
        saved = out / "step_generate.json"
        if saved.exists():
            result = {**json.loads(saved.read_text()), **result}
    return result


def write_step(out: Path, step: str, result: dict) -> None:
    (out / f"step_{step}.json").write_text(json.dumps(result, indent=1, default=str))


def summary(out: Path) -> dict:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("step_*.json"))}
    merged = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps": {k.removeprefix("step_"): v for k, v in parts.items()},
    }
    (out / "gpu_suite.json").write_text(json.dumps(merged, indent=1))
    lines = [f"# GPU suite summary ({merged['date']})", ""]
    for name, value in merged["steps"].items():
        lines.append(f"## {name}")
        lines.append("")
        lines.append("```")
        lines.append(json.dumps(value, indent=1))
        lines.append("```")
        lines.append("")
    (out / "gpu_suite.md").write_text("\n".join(lines))
    return merged


STEPS = {"slice": run_slice, "trainer": run_trainer, "moe": run_moe, "lora": run_lora, "generate": run_generate}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=[*STEPS, "summary"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.step == "summary":
        summary(a.out)
        return
    write_step(a.out, a.step, STEPS[a.step](a.out, a.cpu_smoke))


if __name__ == "__main__":
    main()
