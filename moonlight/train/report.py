"""What a run says on stdout (rank 0): a short header before step 1, one line per checkpoint save or
export, and a closing summary (steps, tokens, time, throughput, losses, where the outputs went). The
step lines are `MetricsLogger`'s; the full config is in <dump_folder>/config.toml (`--print-config`)."""

from __future__ import annotations

import math
import os
import time


def duration(seconds: float) -> str:
    """12.3s, 4:05 or 1:02:03."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def say(line: str) -> None:
    print(f"[moonlight] {line}", flush=True)


class RunReport:
    """Collects what the summary needs while the run goes; prints only on rank 0."""

    def __init__(self, rank: int, start_step: int, total_steps: int, tokens_per_step: int, started: float):
        """started: time.perf_counter() when the run began (the summary's wall time counts the setup)."""
        self.rank, self.start_step, self.total_steps = rank, start_step, total_steps
        self.tokens_per_step = tokens_per_step
        self.started = started
        self.loop_started: float | None = None
        self.step = start_step
        self.loss = self.val_loss = math.nan
        self.best_val: tuple[float, int] | None = None
        self.train_s = 0.0  # time in optimizer steps (the summary's tokens/s and MFU), saves and validation excluded
        self.paths: dict[str, str] = {}

    def print(self, line: str) -> None:
        if self.rank == 0:
            say(line)

    def header(self, lines: list[str]) -> None:
        for line in lines:
            self.print(line)

    def begin(self) -> None:
        self.loop_started = time.perf_counter()

    def step_done(self, step: int, values: dict) -> dict:
        """Record a step's values; returns its elapsed time and ETA (seconds) for the step line."""
        self.step, self.loss = step, values["loss"]
        self.train_s += values.get("step_time_s", 0.0)
        if "val_loss" in values:
            self.val_loss = values["val_loss"]
            if self.best_val is None or self.val_loss < self.best_val[0]:
                self.best_val = (self.val_loss, step)
        elapsed = time.perf_counter() - (self.loop_started or self.started)
        done = step - self.start_step
        return {"elapsed_s": elapsed, "eta_s": elapsed / done * (self.total_steps - step) if done else math.nan}

    def output(self, what: str, step: int, path: str, seconds: float, note: str = "") -> None:
        """A checkpoint save or an export: one line, and its path for the summary."""
        self.paths[what] = path
        self.print(f"step {step}: {what} -> {path} ({duration(seconds)}{note})")

    def summary(self, flops_per_token: float, peak_flops: float, world_size: int) -> None:
        steps = self.step - self.start_step
        if self.rank != 0 or steps <= 0:
            return
        tokens = steps * self.tokens_per_step
        rate = tokens / self.train_s if self.train_s else math.nan
        mfu = 100 * flops_per_token * rate / (peak_flops * world_size)
        say(
            f"done: {steps} steps ({self.start_step + 1}-{self.step}), {tokens:,} tokens in "
            f"{duration(time.perf_counter() - self.started)}; {rate:,.0f} tokens/s, MFU {mfu:.1f}% over the steps"
        )
        val = ""
        if self.best_val is not None:
            val = f"; validation loss {self.val_loss:.4f} final, {self.best_val[0]:.4f} best (step {self.best_val[1]})"
        say(f"final loss {self.loss:.4f} (step {self.step}){val}")
        for what in ("checkpoint", "HF export", "adapter"):
            if what in self.paths:
                say(f"last {what}: {self.paths[what]}")


def relative(path: str) -> str:
    """A path as the user would type it from here: relative when under the working directory."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
