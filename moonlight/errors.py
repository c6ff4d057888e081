"""Errors a user can fix, and how every entry point reports them.

Every error meant for the user derives from `MoonlightError`; its message names what is wrong (the
key, file and line, or checkpoint path) and what to change. Entry points (`train.py`,
`python -m moonlight.convert`, ...) wrap their main in `exit_on_user_error`, which prints such an
error once (rank 0's, or the one rank that met it) as `error: ...` and returns exit code 2 without a traceback. Set
MOONLIGHT_TRACEBACK=1 to see the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

TRACEBACK_ENV = "MOONLIGHT_TRACEBACK"
USER_ERROR_EXIT_CODE = 2


class MoonlightError(Exception):
    """An error the user can fix; the message says what to change."""


class ConfigError(MoonlightError, ValueError):
    """A bad key, value or combination: model arguments, job config, command-line arguments."""


class ParallelConfigError(ConfigError):
    """A parallel configuration that cannot work (degrees vs world size, heads, experts, pipeline stages)."""


class CheckpointError(MoonlightError, ValueError):
    """A checkpoint (ours or Hugging Face's) that is missing, incomplete or does not match; names the path."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (disk full, I/O error, non-finite weights); the previous checkpoint is intact."""


class DataError(MoonlightError, ValueError):
    """Unreadable or malformed training data or tokenizer files; names the file (and line)."""


class NonFiniteError(MoonlightError, RuntimeError):
    """Training (NaN/Inf losses or gradients) or generation (logits) stopped; names where they appeared."""


def exit_on_user_error(main: Callable[[], int | None], reported_by_rank0: Callable[[], bool] | None = None) -> int:
    """Run `main()`; a MoonlightError becomes one `error: ...` line on stderr and exit code 2. Returns
    main's exit code (None counts as 0). Printed once: by rank 0, as every rank of a job meets the same
    error; by another rank (naming it) when it is a lone process (a stale RANK) or when
    `reported_by_rank0()` (called on every failing rank) says rank 0 did not fail."""
    try:
        return main() or 0
    except MoonlightError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        rank = os.environ.get("RANK", "0")
        lone = os.environ.get("WORLD_SIZE", "1") in ("", "0", "1")
        rank0_too = reported_by_rank0() if reported_by_rank0 is not None else True
        if rank == "0" or lone or not rank0_too:
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            where = "" if rank == "0" else f"(rank {rank}) "
            print(f"error: {where}{message}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE


def failing(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the (ok, message) checks that fail: a config section's `problems()`."""
    return [msg for ok, msg in checks if not ok]


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the entry points: a bad argument raises ConfigError, so `exit_on_user_error` prints
    it as the one `error: ...` line (argparse prints its usage and `prog: error: ...` instead). Parse
    inside `exit_on_user_error`; subparsers are made of this class too."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")
