"""One run per workdir: an exclusive `flock` on WORKDIR/.lock, holding the holder's host and pid.

The kernel drops a `flock` when its process dies, so a lock left by `kill -9` is stale by construction: the next
run takes it over (with a warning naming the dead holder). On a shared file system only process 0 of a multi-host
run takes it (the others write nothing but their shards through Orbax)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

import jax


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); "
                f"stop it or use another --workdir") from None
        previous = _read(fd)
        if previous:
            logging.warning("workdir lock: taking over a stale lock left by %s (that run ended without "
                            "releasing it)", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file means "released cleanly"
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?"}


def _describe(holder: dict) -> str:
    if not holder:
        return "unknown holder"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since', '?')}"
