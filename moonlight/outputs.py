"""Writing output directories without deleting anything we did not write.

Writers (the HF export, model-only DCP checkpoints, the converter) name the files they produce with a
pattern; replacing an earlier output (`overwrite`) removes only files matching it, and a directory
holding anything else is refused, never emptied. An output must also not overlap its input.
"""

from __future__ import annotations

import os
import re

from moonlight.errors import CheckpointError

# Read once, at import: os.umask can only be read by setting it, which would race with threads
# (the async checkpoint writer) creating files later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are the same, or one lies inside the other (symlinks resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def check_output(out: str | os.PathLike, source: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output that equals, contains or lies inside its input: replacing it would delete
    the input (or the run folder around it)."""
    if paths_overlap(out, source):
        raise CheckpointError(f"{what} {os.path.abspath(out)} overlaps the input {os.path.abspath(source)} (the same "
                              "directory, or one inside the other); write to a separate directory")


def check_replaceable(path: str, ours: re.Pattern, overwrite: bool, what: str, how: str = "overwrite=True") -> None:
    """Refuse to write into an existing non-empty `path` unless `overwrite`, and even then if it holds
    anything that is not `what` (names matching `ours`): it is never ours to delete. `how`: how the
    caller's user asks to overwrite (a command line: "--overwrite")."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} exists and is not a directory; pick another output path")
    entries = sorted(os.listdir(path))
    if entries and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; pass {how} to replace it")
    foreign = [e for e in entries if not (ours.match(e) and os.path.isfile(os.path.join(path, e)))]
    if foreign:
        raise CheckpointError(f"{path} holds files that are not part of {what}: {foreign[:5]}; refusing to replace "
                              "it (remove them, or pick another output path)")


def remove_own_dir(path: str, ours: re.Pattern) -> None:
    """Delete the files of `path` named like a writer's output, then the directory if that emptied it
    (os.rmdir: never a directory that still holds anything else)."""
    for name in os.listdir(path):
        if ours.match(name):
            os.remove(os.path.join(path, name))
    try:
        os.rmdir(path)
    except OSError as e:
        raise CheckpointError(f"cannot replace {path}: it holds files that are not ours ({e})") from None


def publish_mode(tmp: str) -> None:
    """Give a finished temporary output directory and everything in it the modes a plain mkdir / open
    would have (0777 / 0666 less the umask) before it is renamed into place: mkdtemp makes it 0700 and
    safetensors writes its files 0600, which would hide an export from the other users of a shared
    filesystem."""
    for root, _, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~_UMASK)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~_UMASK)
