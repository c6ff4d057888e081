"""Writing output directories without deleting anything we did not write.

Writers (the HF export, model-only DCP checkpoints, the converter) name the files they produce with a
pattern; replacing an earlier output (`overwrite`) removes only files matching it, and a directory
holding anything else is refused, never emptied. An output must also not overlap its input. A file or
folder of ours is never written through a symlink; what a rollback leaves behind is moved into an
`abandoned-<time>` folder; a failed write names disk-full and read-only filesystems as such.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

from moonlight.errors import CheckpointError, CheckpointSaveError, ConfigError

_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


# Read once, at import: os.umask can only be read by setting it, which would race with threads
# (the async checkpoint writer) creating files later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def inside(path: str) -> bool:
    """Whether a path under job.dump_folder stays inside it (relative, no '..', no '~')."""
    parts = pathlib.PurePath(path).parts
    return not os.path.isabs(path) and ".." not in parts and not (parts and parts[0].startswith("~"))


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are the same, or one lies inside the other (symlinks resolved)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def check_output(out: str | os.PathLike, source: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output that equals, contains or lies inside its input: replacing it would delete
    the input (or the run folder around it)."""
    if paths_overlap(out, source):
        raise CheckpointError(
            f"{what} {os.path.abspath(out)} overlaps the input {os.path.abspath(source)} (the same "
            "directory, or one inside the other); write to a separate directory"
        )


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
        raise CheckpointError(
            f"{path} holds files that are not part of {what}: {foreign[:5]}; refusing to replace "
            "it (remove them, or pick another output path)"
        )


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


def os_error_reason(e: BaseException) -> str:
    """An OSError's cause in words, naming the two a user fixes outside Python: a full disk (or quota)
    and a read-only filesystem."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if code == errno.EROFS:
        return "read-only filesystem"
    return getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"


def refuse_link(path: str, kind: str = "file") -> None:
    """Raise ConfigError when `path`, where we write a `kind` ("file" or "folder") of our own, is a symlink
    (we would write through it, outside the folder) or the other kind of entry."""
    if os.path.islink(path):
        raise ConfigError(
            f"{path} is a symlink (to {os.readlink(path)}) where moonlight writes its own {kind}: "
            "remove the link (moonlight never writes through one), or use another --job.dump_folder"
        )
    if os.path.exists(path) and (os.path.isdir(path) if kind == "file" else not os.path.isdir(path)):
        raise ConfigError(
            f"{path} is a {'directory' if kind == 'file' else 'file'} where moonlight writes its own "
            f"{kind}: move it away, or use another --job.dump_folder"
        )


def abandoned_folder(dump_folder: str) -> str:
    """A new `<dump_folder>/abandoned-<UTC time>` path (not created) for a rollback's later steps."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(dump_folder, f"abandoned-{stamp}")
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def storage_problem(exc: BaseException | None, folder: str | None = None) -> str | None:
    """ "disk full" or "read-only filesystem" when that is why a write failed (an OSError's errno, anywhere in
    the exception's chain or a DCP CheckpointException's per-rank failures; or, for errors that carry no
    errno such as torch's "unexpected pos" zip writer, no free space left on `folder`); else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno in _STORAGE_ERRNOS:
            return os_error_reason(exc)
        for text, reason in (
            ("No space left on device", "disk full"),
            ("Read-only file system", "read-only filesystem"),
        ):
            if text in str(exc):
                return reason
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                found = storage_problem(f[0] if isinstance(f, tuple) else f)
                if found:
                    return found
        exc = exc.__cause__ or exc.__context__
    if folder is not None:
        try:
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < _NEARLY_FULL:
                return "disk full"
        except OSError:
            pass
    return None


@contextlib.contextmanager
def staged_output(path: str, what: str, prefix: str = ".tmp-save-") -> Iterator[str]:
    """A temporary directory beside `path` for the body to fill and rename into place; removed whatever
    happens (a no-op once renamed). A write that failed for a full disk or a read-only filesystem
    becomes a CheckpointSaveError saying so."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as e:
        raise CheckpointSaveError(
            f"cannot write {what} {path}: {storage_problem(e) or e.strerror} ({parent}); write elsewhere"
        ) from None
    try:
        yield tmp
    except Exception as e:
        reason = None if isinstance(e, CheckpointError) else storage_problem(e, parent)
        if reason:
            raise CheckpointSaveError(
                f"writing {what} {path} failed: {reason} ({type(e).__name__}: {e}); the "
                "partial output was removed: free space (or write elsewhere) and rerun"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
