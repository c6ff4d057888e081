"""The learning-rate schedule: warmup, then cosine, linear or WSD decay to a floor; one LambdaLR per
optimizer, stepped together (state through each scheduler's state_dict()).

    schedulers = LRSchedulerSection(warmup_steps=2).build(optimizers, total_steps=100)

A knob of the schedule is a field of `LRSchedulerSection` (the [lr_scheduler] section) and a keyword
of `lr_multiplier` of the same name: `build` hands every field to it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from moonlight.errors import failing


def lr_multiplier(
    step: int,
    warmup_steps: int,
    total_steps: int,
    decay_type: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_ratio: float = 0.2,
) -> float:
    """LR multiplier for 0-based optimizer step ``step``.

    Warmup (step < warmup_steps): ``(step + 1) / (warmup_steps + 1)`` — the first step uses
    lr/(warmup+1), reaching 1.0 at step == warmup_steps. Then decay to ``min_lr_ratio`` at
    step == total_steps (held there afterwards):
      cosine: min + (1-min) * 0.5*(1 + cos(pi * p)), p = (step-warmup)/(total-warmup)
      linear: min + (1-min) * (1 - p)
      wsd:    1.0 (stable) until the last ``decay_ratio * total_steps`` steps, then linear to min.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    m = min_lr_ratio
    if decay_type == "wsd":
        decay_steps = int(round(decay_ratio * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        p = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return m + (1 - m) * (1 - p)
    p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if decay_type == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    if decay_type == "linear":
        return m + (1 - m) * (1 - p)
    raise ValueError(f"unknown decay_type {decay_type!r}")


class _Multiplier:
    """Picklable lr lambda (LambdaLR.state_dict stores its __dict__)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, **self.__dict__)


class LRSchedulers:
    """One LambdaLR per optimizer, stepped together. ``.schedulers`` is the plain list."""

    def __init__(self, schedulers: Sequence[LambdaLR]):
        self.schedulers = list(schedulers)

    def __iter__(self):
        return iter(self.schedulers)

    def __len__(self):
        return len(self.schedulers)

    def step(self):
        for s in self.schedulers:
            s.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    @property
    def last_epoch(self) -> int:
        return self.schedulers[0].last_epoch

    def state_dict(self) -> dict:
        return {str(i): s.state_dict() for i, s in enumerate(self.schedulers)}

    def load_state_dict(self, state_dict: dict):
        for i, s in enumerate(self.schedulers):
            s.load_state_dict(state_dict[str(i)])


@dataclass
class LRSchedulerSection:
    warmup_steps: int = 20
    """Linear warmup steps from 0 to optimizer.lr."""
    decay_type: Literal["cosine", "linear", "wsd"] = "cosine"
    """Decay after warmup: cosine, linear, or WSD (stable, then a linear decay)."""
    decay_ratio: float = 0.2
    """WSD only: the fraction of training.steps spent in the final (linear) decay."""
    min_lr_ratio: float = 0.1
    """Final lr = optimizer.lr * min_lr_ratio (the pretrain recipe: 4.2e-4 -> 4.2e-5)."""

    def problems(self, steps: int) -> list[str]:
        out = failing(
            [
                (self.warmup_steps >= 0, f"lr_scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})"),
                (
                    self.warmup_steps <= steps,
                    f"lr_scheduler.warmup_steps ({self.warmup_steps}) must be <= training.steps ({steps})",
                ),
                (
                    0 <= self.min_lr_ratio <= 1,
                    "lr_scheduler.min_lr_ratio must be in [0, 1], i.e. min lr <= optimizer.lr "
                    f"(got {self.min_lr_ratio})",
                ),
                (0 <= self.decay_ratio <= 1, f"lr_scheduler.decay_ratio must be in [0, 1] (got {self.decay_ratio})"),
            ]
        )
        if self.decay_type == "wsd" and 0 <= self.decay_ratio <= 1:
            decay_steps = round(self.decay_ratio * steps)
            if self.warmup_steps + decay_steps > steps:
                out.append(
                    f"lr_scheduler.warmup_steps ({self.warmup_steps}) + decay steps (decay_ratio "
                    f"{self.decay_ratio} * {steps} = {decay_steps}) exceed training.steps ({steps})"
                )
        return out

    def build(self, optimizers, total_steps: int) -> LRSchedulers:
        """LambdaLR(s) with ``lr_multiplier`` over an Optimizers container, a list, or one optimizer.

        Call ``.step()`` once after each optimizer step. Right after construction the lr is
        ``lr * lr_multiplier(0)`` (used by the first optimizer step).
        """
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        fn_kw = {**dataclasses.asdict(self), "total_steps": total_steps}
        lr_multiplier(0, **fn_kw)  # validate decay_type early
        return LRSchedulers([LambdaLR(o, _Multiplier(**fn_kw)) for o in optimizers])
