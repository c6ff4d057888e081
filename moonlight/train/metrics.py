"""Training metrics: a readable line on stdout (rank 0), `metrics.jsonl`, optional TensorBoard, MFU, and
the [metrics] section (`MetricsSection`: what is logged, when, and the profiler)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import time
import warnings
from dataclasses import dataclass

import torch

from moonlight.errors import failing
from moonlight.outputs import abandoned_folder, inside, os_error_reason, refuse_link
from moonlight.train.report import duration

logger = logging.getLogger(__name__)


def measure_peak_flops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square matmul on this device: the MFU denominator when no peak
    is configured (fp32 on CPU, bf16 on GPUs, the dtype each would train in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name;
# the first match wins (more specific names first). TF32 runs at half of it on these parts.
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("MI300X", 1307.4),
    ("MI325X", 1307.4),
)


def spec_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak FLOP/s of a GPU for matmuls in `dtype` (fp32 as TF32), None if unknown."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
    return None


# CPUs have no spec table here, and a matmul timed at each start varied 5x between runs on one shared
# machine: CPU MFU is against this fixed nominal peak per rank, comparable between runs (not machines).
CPU_NOMINAL_PEAK_FLOPS = 100e9


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator: the spec peak on a known GPU (a timed matmul includes launch latency and
    under-reads the peak, overstating MFU), a timed matmul on unknown GPUs, CPU_NOMINAL_PEAK_FLOPS on CPUs."""
    if device.type == "cpu":
        return CPU_NOMINAL_PEAK_FLOPS
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = spec_peak_flops(name, dtype)
        if spec is not None:
            return spec
        warnings.warn(
            f"no spec peak for GPU {name!r}: MFU uses a timed matmul (set metrics.device_peak_flops)", stacklevel=2
        )
    return measure_peak_flops(device)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPUs, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@dataclass
class MetricsSection:
    log_freq: int = 1
    """Print and record metrics every N steps (and the last step)."""
    enable_tensorboard: bool = False
    """Also write TensorBoard events under job.dump_folder/tb_folder."""
    tb_folder: str = "tb"
    """Under job.dump_folder."""
    device_peak_flops: float = 0.0
    """Peak FLOP/s of one device (rank) for MFU; 0 = a known GPU's spec peak, a timed matmul on other GPUs,
    a nominal 100 GFLOP/s per rank on CPU (comparable between runs, not between machines)."""
    profile_start: int = 0
    """First profiled step; 0 = profiling off."""
    profile_steps: int = 0
    """Steps recorded by torch.profiler from profile_start on."""

    def problems(self) -> list[str]:
        return failing(
            [
                (self.log_freq >= 1, f"metrics.log_freq must be >= 1 (got {self.log_freq})"),
                (self.device_peak_flops >= 0, f"metrics.device_peak_flops must be >= 0 (got {self.device_peak_flops})"),
                (self.profile_start >= 0, f"metrics.profile_start must be >= 0 (got {self.profile_start})"),
                (self.profile_steps >= 0, f"metrics.profile_steps must be >= 0 (got {self.profile_steps})"),
                (
                    self.profile_steps == 0 or self.profile_start >= 1,
                    f"metrics.profile_steps={self.profile_steps} needs metrics.profile_start >= 1",
                ),
                (
                    bool(self.tb_folder) and inside(self.tb_folder),
                    f"metrics.tb_folder = {self.tb_folder!r} must be a relative path inside job.dump_folder (point "
                    "job.dump_folder elsewhere instead)",
                ),
            ]
        )

    def build(self, dump_folder: str, rank: int, resume_step: int = 0, aside: str | None = None) -> MetricsLogger:
        """The run's `MetricsLogger` (see its resume_step and aside)."""
        return MetricsLogger(dump_folder, rank, self.enable_tensorboard, self.tb_folder, resume_step, aside)

    def mfu_peak(self, device: torch.device, dtype: torch.dtype) -> float:
        """One device's peak FLOP/s, the MFU denominator: device_peak_flops, else `peak_flops`'s."""
        return self.device_peak_flops or peak_flops(device, dtype)

    def profiler(self, dump_folder: str, rank: int) -> torch.profiler.profile | None:
        """torch.profiler over steps profile_start.. (traces in <dump_folder>/profile); None when off."""
        if not self.profile_start or not self.profile_steps:
            return None
        return torch.profiler.profile(
            # active from step profile_start on; the step before it warms the profiler up
            schedule=torch.profiler.schedule(
                wait=max(self.profile_start - 2, 0),
                warmup=min(self.profile_start - 1, 1),
                active=self.profile_steps,
                repeat=1,
            ),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                os.path.join(dump_folder, "profile"), worker_name=f"rank{rank}"
            ),
        )


# The step line: metrics.jsonl key, its label, its format (units in the format, not in the label).
STEP_LINE = (
    ("grad_norm", "grad_norm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu_pct", "mfu", "{:.1f}%"),
    ("memory_gib", "memory", "{:.2f} GiB"),
    ("max_expert_load", "max_expert_load", "{:.2f}"),
    ("val_loss", "val_loss", "{:.4f}"),
    ("val_ppl", "val_ppl", "{:.2f}"),
    ("elapsed_s", "elapsed", duration),
    ("eta_s", "eta", duration),
)


class MetricsLogger:
    """Writes one JSON object per logged step to `<dump_folder>/metrics.jsonl` and prints a line."""

    def __init__(
        self,
        dump_folder: str,
        rank: int,
        enable_tensorboard: bool = False,
        tb_folder: str = "tb",
        resume_step: int = 0,
        aside: str | None = None,
    ):
        """resume_step > 0: keep the records up to that step and append. Records after it (a run killed
        after its last checkpoint, or the branch a rollback leaves) move to `<aside>/metrics.jsonl`
        (default: a new abandoned-<time> folder; `self.set_aside` lists their steps) and the kept ones
        replace the file atomically, never truncating it in place; a torn line is dropped with a
        warning. 0: start a new file, moving a previous run's file to metrics.jsonl.N with a warning."""
        self.rank = rank
        self.path = os.path.join(dump_folder, "metrics.jsonl")
        self.set_aside: list[int] = []  # steps whose records were moved aside
        self._write_failed = False  # warned once per run of failed writes
        self._file = None
        self._tb = None
        if rank == 0:
            os.makedirs(dump_folder, exist_ok=True)
            refuse_link(self.path)
            if resume_step:
                self._keep_up_to(resume_step, aside or abandoned_folder(dump_folder))
            elif os.path.exists(self.path) and os.path.getsize(self.path):
                old = next(f"{self.path}.{n}" for n in itertools.count(1) if not os.path.exists(f"{self.path}.{n}"))
                os.replace(self.path, old)
                logger.warning("metrics: %s holds a previous run's records: moved to %s", self.path, old)
            self._file = open(self.path, "a" if resume_step else "w")
            if enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(dump_folder, tb_folder))

    def _keep_up_to(self, resume_step: int, aside: str) -> None:
        if not os.path.exists(self.path):
            return
        kept, later, torn = [], [], False
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                line = line if line.endswith("\n") else line + "\n"
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):  # torn by a kill or a full disk mid-write
                    logger.warning("metrics: dropping unreadable line %d of %s", lineno, self.path)
                    torn = True
                    continue
                (kept if isinstance(step, int) and step <= resume_step else later).append((step, line))
        if later:
            os.makedirs(aside, exist_ok=True)
            with open(os.path.join(aside, "metrics.jsonl"), "x", encoding="utf-8") as f:
                f.writelines(line for _, line in later)
            self.set_aside = [s for s, _ in later]
        if later or torn:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line for _, line in kept)
            os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **values}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # rank 0 alone: raising would leave the other ranks waiting in a collective
            if not self._write_failed:
                logger.error(
                    "metrics: cannot write %s (%s) from step %d on: training goes on, its records are "
                    "lost until it can be written (checkpoint saves fail loudly)",
                    self.path,
                    os_error_reason(e),
                    step,
                )
            self._write_failed = True
        else:
            self._write_failed = False
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        parts = [f"step {step:>5}", f"loss {values['loss']:.4f}"]
        for key, label, fmt in STEP_LINE:
            if key in values:
                parts.append(f"{label} " + (fmt(values[key]) if callable(fmt) else fmt.format(values[key])))
        print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
