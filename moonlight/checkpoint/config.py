"""The [checkpoint] section: when and where the run saves, what it resumes or starts from, and what it
exports. `Checkpointer` (moonlight.checkpoint.state) is built from it: `Checkpointer(section, ...)`.

Kept apart from state.py, which imports the model, so that reading a job config stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moonlight.errors import failing
from moonlight.outputs import inside


@dataclass
class CheckpointSection:
    enable: bool = False
    """Save checkpoints (and resume from the latest one in the dump folder)."""
    interval: int = 100
    """Save every N steps (and after the last step)."""
    keep_latest_k: int = 2
    """0 = keep all."""
    folder: str = "checkpoint"
    """Under job.dump_folder."""
    load_step: int = -1
    """-1 = the latest checkpoint in folder (if any)."""
    initial_load_hf: str = ""
    """HF checkpoint directory (or a model-only DCP checkpoint from `python -m moonlight.convert hf-to-dcp`)
    to start from when no checkpoint of this run exists."""
    export_hf: Literal["", "end", "each"] = ""
    """Also write an HF-format checkpoint (<dump_folder>/hf/step-N): never, at the end, or at each save
    ("each" keeps every export: keep_latest_k rotates the checkpoints only)."""
    async_mode: Literal["", "async"] = ""
    """"async": training goes on while a save is written (staged to CPU first; one save in flight,
    COMPLETE written when the next save starts or training ends). "" = the step waits for the save."""
    frozen_weights: Literal["auto", "save", "reload"] = "auto"
    """Frozen (not trained) weights: "save" them in every checkpoint, or "reload" them from
    initial_load_hf on resume, so a LoRA/DoRA checkpoint holds the adapters, buffers and optimizer
    state only. "auto": "reload" in a LoRA/DoRA run with initial_load_hf, else "save"."""
    other_base: bool = False
    """Resume a LoRA/DoRA checkpoint whose frozen weights were read from another directory than
    initial_load_hf (the same base, moved); otherwise that is refused: other weights under the adapters."""

    def problems(self) -> list[str]:
        return failing(
            [
                (self.interval >= 1, f"checkpoint.interval must be >= 1 (got {self.interval})"),
                (
                    self.keep_latest_k >= 0,
                    f"checkpoint.keep_latest_k must be >= 0 (0 = keep all; got {self.keep_latest_k})",
                ),
                (
                    self.load_step >= -1,
                    f"checkpoint.load_step must be -1 (latest) or a step >= 0 (got {self.load_step})",
                ),
                (
                    self.enable or self.load_step == -1,
                    f"checkpoint.load_step = {self.load_step} resumes from a checkpoint, "
                    "which checkpoint.enable = false turns off: set checkpoint.enable = true",
                ),
                (bool(self.folder), "checkpoint.folder must not be empty"),
                # inside the (locked) dump folder: rotation and cleanup then delete only this run's saves
                (
                    inside(self.folder),
                    f"checkpoint.folder = {self.folder!r} must be a relative path inside job.dump_folder "
                    "(point job.dump_folder elsewhere instead)",
                ),
            ]
        )
