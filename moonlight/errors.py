"""Errors a user can fix, and how every entry point reports them.

Every error meant for the user derives from `MoonlightError`; its message names what is wrong (the
key, file and line, or checkpoint path) and what to change. Entry points (`train.py`,
`python -m moonlight.convert`, ...) wrap their main in `exit_on_user_error`, which reports such an
error as one `error: ...` line and returns exit code 2 without a traceback. Set MOONLIGHT_TRACEBACK=1
to see the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

TRACEBACK_ENV = "MOONLIGHT_TRACEBACK"
USER_ERROR_EXIT_CODE = 2


class MoonlightError(Exception):
    """An error the user can fix; the message says what to change."""


class ConfigError(MoonlightError, ValueError):
    """A bad key, value or combination: model arguments, job config, command-line arguments."""


class ParallelConfigError(ConfigError):
    """A parallel layout that cannot work (degrees vs world size, heads, experts, pipeline stages)."""


class CheckpointError(MoonlightError, ValueError):
    """A checkpoint (ours or Hugging Face's) that is missing, incomplete or does not match; names the path."""


class CheckpointSaveError(CheckpointError):
    """A save that failed (disk full, I/O error, non-finite weights); the previous checkpoint is intact."""


class DataError(MoonlightError, ValueError):
    """Unreadable or malformed training data or tokenizer files; names the file (and line)."""


class NonFiniteError(MoonlightError, RuntimeError):
    """Training stopped on NaN/Inf losses or gradients; names where they appeared."""


def exit_on_user_error(main: Callable[[], int | None]) -> int:
    """Run `main()`; a MoonlightError becomes exit code 2 and one `error: ...` line, printed by rank 0
    (every rank of a job usually meets the same error). Under torchrun every rank also writes it to its
    error file, so torchrun's failure summary names an error that another rank met alone; without
    torchrun the other ranks print it too, tagged with their rank. Returns main's exit code (None: 0)."""
    try:
        return main() or 0
    except MoonlightError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        report_user_error(e)
        return USER_ERROR_EXIT_CODE


def report_user_error(error: MoonlightError) -> None:
    """Print (or hand torchrun) `error` as one line; see `exit_on_user_error`."""
    message = "error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    rank = os.environ.get("RANK", "0")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            error_file = None  # an unwritable error file: print it instead
    if rank == "0":
        print(message, file=sys.stderr, flush=True)
    elif not error_file:
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the entry points: a bad argument raises ConfigError, so `exit_on_user_error` prints
    it as the one `error: ...` line (argparse prints its usage and `prog: error: ...` instead). Parse
    inside `exit_on_user_error`; subparsers are made of this class too."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")
