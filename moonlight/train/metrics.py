"""Training metrics: a readable line on stdout (rank 0), `metrics.jsonl`, optional TensorBoard, MFU."""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import time
import warnings

import torch

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
    ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("L40S", 362.1),
    ("MI300X", 1307.4), ("MI325X", 1307.4),
)


def spec_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak FLOP/s of a GPU for matmuls in `dtype` (fp32 as TF32), None if unknown."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU denominator: the spec peak on a known GPU (a timed matmul includes launch latency and
    under-reads the peak, overstating MFU), the timed matmul on CPUs and unknown GPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = spec_peak_flops(name, dtype)
        if spec is not None:
            return spec
        warnings.warn(f"no spec peak for GPU {name!r}: MFU uses a timed matmul (set metrics.device_peak_flops)",
                      stacklevel=2)
    return measure_peak_flops(device)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPUs, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsLogger:
    """Writes one JSON object per logged step to `<dump_folder>/metrics.jsonl` and prints a line."""

    def __init__(self, dump_folder: str, rank: int, enable_tensorboard: bool = False, tb_folder: str = "tb",
                 resume_step: int = 0):
        """resume_step > 0: keep the records up to that step (a run killed after its last checkpoint
        logged steps that the resumed run repeats; a torn last line is dropped with a warning) and
        append; 0: start a new file, moving a previous run's file to metrics.jsonl.N with a warning."""
        self.rank = rank
        self.path = os.path.join(dump_folder, "metrics.jsonl")
        self._file = None
        self._tb = None
        if rank == 0:
            os.makedirs(dump_folder, exist_ok=True)
            kept = self._records_to_keep(resume_step) if resume_step else []
            if not resume_step and os.path.exists(self.path) and os.path.getsize(self.path):
                old = next(f"{self.path}.{n}" for n in itertools.count(1) if not os.path.exists(f"{self.path}.{n}"))
                os.replace(self.path, old)
                logger.warning("metrics: %s holds a previous run's records: moved to %s", self.path, old)
            self._file = open(self.path, "w")
            self._file.writelines(kept)
            if enable_tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(dump_folder, tb_folder))

    def _records_to_keep(self, resume_step: int) -> list[str]:
        if not os.path.exists(self.path):
            return []
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):  # torn by a kill or a full disk mid-write
                    logger.warning("metrics: dropping unreadable line %d of %s", lineno, self.path)
                    continue
                if step <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        return kept

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        parts = [f"step {step:>5}", f"loss {values['loss']:.4f}"]
        for key, fmt in (("grad_norm", "{:.3f}"), ("lr", "{:.2e}"), ("tokens_per_s", "{:,.0f}"),
                         ("mfu_pct", "{:.1f}%"), ("memory_gib", "{:.2f}GiB"), ("max_expert_load", "{:.2f}"),
                         ("val_loss", "{:.4f}"), ("val_ppl", "{:.2f}")):
            if key in values:
                parts.append(f"{key} " + fmt.format(values[key]))
        print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
