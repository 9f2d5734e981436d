"""One workflow run per working directory, with a lock that cannot go stale.

Snakemake's own lock is a file that a killed run leaves behind, so the next run is refused until the user runs
``--unlock``. fewseg instead holds an OS file lock (``flock``) for as long as the Snakemake process lives: a second
run on the same folder is refused with the first run's pid and command, and a run killed by any signal, ``kill -9``
included, releases the lock with its process, so the same command simply runs again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

_HELD: dict[str, int] = {}  # lock path -> open file descriptor, kept for the life of the process


class RunLockError(RuntimeError):
    """Another run holds the folder."""


def acquire(path: str | os.PathLike) -> None:
    """Take the folder's run lock for this process, or raise :class:`RunLockError` naming the holder."""
    path = Path(path).resolve()
    if str(path) in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.read(fd, 4096))
        os.close(fd)
        raise RunLockError(
            f"another run of this workflow is using {Path.cwd()} ({holder}); "
            "wait for it to finish or stop it, then run again (a stopped or killed run leaves no lock behind)"
        ) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[str(path)] = fd


def _describe(raw: bytes) -> str:
    try:
        record = json.loads(raw.decode())
        return f"pid {record['pid']} on {record['host']}, started {record['started']}: {record['command']}"
    except (ValueError, KeyError):
        return "holder unknown"
