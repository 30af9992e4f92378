"""Atomic claims on job folders, safe across processes and hosts sharing a filesystem.

A claim is an exclusive ``flock`` on the folder's ``.lock`` file, which records its owner
(host, pid, time) for operators. The kernel drops the lock when the owner dies, however it
dies, so a killed worker's claim is recovered by the next process that tries; no stale-lock
timeout is needed. Folders move between states by rename while claimed: the lock travels with
the folder, and a process that opened the old path finds it gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCKFILE = ".lock"


class Claim:
    """An exclusive hold on a job folder; release it with :meth:`release` or ``with``."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def moved_to(self, folder: Path) -> None:
        """Record that the claimed folder was renamed (the lock stays held)."""
        self.folder = folder

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def try_claim(folder: Path) -> Claim | None:
    """Claim ``folder`` if nobody holds it and it still exists; else return None."""
    lock_path = folder / LOCKFILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    # The folder may have been moved or removed between open and lock by the previous owner.
    try:
        same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
    except FileNotFoundError:
        same = False
    if not same or os.fstat(fd).st_nlink == 0:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return None
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
    return Claim(folder, fd)


def claim_owner(folder: Path) -> dict[str, object] | None:
    """Who last claimed ``folder`` (for ``mercure job show``), or None."""
    try:
        data = json.loads((folder / LOCKFILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_claimed(folder: Path) -> bool:
    """True if a live process holds the claim on ``folder`` right now."""
    claim = try_claim(folder)
    if claim is None:
        return (folder / LOCKFILE).exists()
    claim.release()
    return False
