"""One trainer per dump folder: `<dump_folder>/.lock` holds the owner's host, pid and start time.

Rank 0 takes it before the run writes anything (config.toml, metrics.jsonl, checkpoints), in the
folder's real path, and in the real path of the checkpoint folder too when a symlink puts that
elsewhere (another run's checkpoints, reached through a link, are then locked as well). A second
trainer stops at once with the owner's details. A lock left by a killed run on this host (its pid
is gone) is replaced with a warning; one from another host cannot be checked, so the error says how
to remove it. Released when the trainer finishes or the process exits.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import time
import uuid

from moonlight.errors import ConfigError
from moonlight.outputs import os_error_reason

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _command_of(pid: int) -> str:
    """The command line of a local pid ('' when it cannot be read), to tell a trainer from a pid reused by
    another program after a crash."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class DumpFolderLock:
    """The lock files of one run: `<real dump folder>/.lock`, and `<real folder>/.lock` of each of `also`
    (the checkpoint folder) that lies elsewhere once symlinks are resolved."""

    def __init__(self, dump_folder: str | os.PathLike, also: tuple[str | os.PathLike, ...] = ()):
        dump = os.path.realpath(os.path.expanduser(os.fspath(dump_folder)))
        self.path = os.path.join(dump, LOCK_FILE)
        self.paths = [self.path] + [os.path.join(os.path.realpath(f), LOCK_FILE) for f in also]
        self.paths = list(dict.fromkeys(self.paths))
        self.held: list[str] = []
        self.token = None

    def acquire(self) -> None:
        """Create the lock files (atomically, O_EXCL); raise ConfigError if a live trainer holds one."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self.token = me["token"]
        try:
            for path in self.paths:
                self._acquire_one(path, me)
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)

    def _acquire_one(self, path: str, me: dict) -> None:
        folder = os.path.dirname(path)
        key = "job.dump_folder" if path == self.path else "the checkpoint folder"
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:  # a file of that name, or a file on the way to it
            raise ConfigError(f"cannot create {key} {folder}: {e.strerror}; use another --job.dump_folder") from None
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise ConfigError(
                f"{path} is a {'symlink' if os.path.islink(path) else 'directory'}, not a lock file "
                "written by moonlight: remove it (or use another --job.dump_folder)"
            )
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_raise(path, me)
                continue
            except OSError as e:  # read-only, no permission, disk full
                raise ConfigError(
                    f"cannot write to {key} {folder} ({os_error_reason(e)}): make it writable, or use "
                    "another --job.dump_folder"
                ) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:  # a full disk at close: no half-written lock left behind
                os.remove(path)
                raise ConfigError(
                    f"cannot write the lock {path} ({os_error_reason(e)}): free space, or use another --job.dump_folder"
                ) from None
            self.held.append(path)
            return
        raise ConfigError(f"cannot take the lock {path}: another trainer keeps creating it")

    def _clear_stale_or_raise(self, path: str, me: dict) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                owner = json.load(f)
            host, pid = owner["host"], int(owner["pid"])
        except FileNotFoundError:
            return  # released in the meantime
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(path) < 10:  # another trainer is writing it right now
                raise ConfigError(
                    f"{os.path.dirname(path)} is being locked by another trainer just now: "
                    "use another --job.dump_folder"
                ) from None
            owner, host, pid = {}, None, None  # unreadable and old: a lock torn by a crash while being written
        same_host = host == me["host"]
        # the same process (an earlier Trainer here) or a dead pid on this host: nobody is using it
        if host is None or (same_host and (pid == me["pid"] or not _pid_alive(pid))):
            if pid != me["pid"]:
                logger.warning(
                    "replacing the stale lock %s (%s: no such process on this host)", path, owner or "unreadable"
                )
            os.remove(path)
            return
        where = "this host" if same_host else f"host {host}"
        command = _command_of(pid) if same_host else ""
        hint = (
            f" (if it is no longer running, delete {path})"
            if not same_host
            else f" (pid {pid} now runs {command[:80]!r}, which may not be a trainer: a pid reused after a crash? If "
            f"no trainer uses the folder, delete {path})"
            if command and "python" not in command
            else ""
        )
        raise ConfigError(
            f"{os.path.dirname(path)} is in use by another trainer (pid {pid} on {where}, started "
            f"{owner.get('started')}): use another --job.dump_folder, or stop that run" + hint
        )

    def release(self) -> None:
        atexit.unregister(self.release)
        held, self.held = self.held, []
        for path in held:
            try:
                with open(path, encoding="utf-8") as f:
                    mine = json.load(f).get("token") == self.token  # not a lock taken over since
            except (OSError, ValueError):
                mine = False
            if mine:
                os.remove(path)
