"""One trainer per dump folder: `<dump_folder>/.lock` holds the owner's host, pid and start time.

Rank 0 takes it before the run writes anything (config.toml, metrics.jsonl, checkpoints). A second
trainer on the folder stops at once with the owner's details. A lock left by a killed run on this
host (its pid is gone) is replaced with a warning; one from another host cannot be checked, so the
error says how to remove it. Released when the trainer finishes or the process exits.
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


class DumpFolderLock:
    def __init__(self, dump_folder: str | os.PathLike):
        self.path = os.path.join(os.path.abspath(os.fspath(dump_folder)), LOCK_FILE)
        self.held = False
        self.token = None

    def acquire(self) -> None:
        """Create the lock file (atomically, O_EXCL); raise ConfigError if a live trainer holds it."""
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:  # a file of that name, or a file on the way to it
            raise ConfigError(f"cannot create job.dump_folder {folder}: {e.strerror}; use another --job.dump_folder"
                              ) from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "token": uuid.uuid4().hex}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_raise(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held, self.token = True, me["token"]
            atexit.register(self.release)
            return
        raise ConfigError(f"cannot take the lock {self.path}: another trainer keeps creating it")

    def _clear_stale_or_raise(self, me: dict) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
            host, pid = owner["host"], int(owner["pid"])
        except FileNotFoundError:
            return  # released in the meantime
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(self.path) < 10:  # another trainer is writing it right now
                raise ConfigError(f"{os.path.dirname(self.path)} is being locked by another trainer just now: "
                                  "use another --job.dump_folder") from None
            owner, host, pid = {}, None, None  # unreadable and old: a lock torn by a crash while being written
        same_host = host == me["host"]
        # the same process (an earlier Trainer here) or a dead pid on this host: nobody is using it
        if host is None or (same_host and (pid == me["pid"] or not _pid_alive(pid))):
            if pid != me["pid"]:
                logger.warning("replacing the stale lock %s (%s: no such process on this host)", self.path,
                               owner or "unreadable")
            os.remove(self.path)
            return
        where = "this host" if same_host else f"host {host}"
        raise ConfigError(f"{os.path.dirname(self.path)} is in use by another trainer (pid {pid} on {where}, started "
                          f"{owner.get('started')}): use another --job.dump_folder, or stop that run"
                          + ("" if same_host else f" (if it is no longer running, delete {self.path})"))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        try:
            with open(self.path, encoding="utf-8") as f:
                mine = json.load(f).get("token") == self.token  # not a lock taken over since
        except (OSError, ValueError):
            mine = False
        if mine:
            os.remove(self.path)
