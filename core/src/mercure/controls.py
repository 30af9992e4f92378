"""Operator controls that live in the spool, so every process on it obeys them.

mercure's ``HALT`` file suspends a service: in ``outgoing/`` the dispatcher starts no new
delivery, in ``processing/`` the processor starts no new job; work already running goes on.
The file is what mercure's UI writes; here it also records who suspended the service and
when (mercure ignores its content).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Literal

from mercure.config import Config
from mercure.fsutil import atomic_write_bytes, fsync_dir

HALT = "HALT"
Controlled = Literal["dispatching", "processing"]
CONTROLLED: tuple[Controlled, ...] = ("dispatching", "processing")
FOLDER_OF: dict[Controlled, str] = {"dispatching": "outgoing", "processing": "processing"}


def current_user() -> str:
    """The user running this process, for the records of operator actions."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def halt_file(config: Config, what: Controlled) -> Path:
    return config.folder(FOLDER_OF[what]) / HALT


def is_suspended(config: Config, what: Controlled) -> bool:
    return halt_file(config, what).exists()


def suspended_by(config: Config, what: Controlled) -> dict[str, object] | None:
    """Who suspended ``what`` and when (``{}`` for a HALT file mercure wrote); None if running."""
    try:
        text = halt_file(config, what).read_text()
    except FileNotFoundError:
        return None
    with contextlib.suppress(ValueError):
        data = json.loads(text or "{}")
        if isinstance(data, dict):
            return data
    return {}


def suspend(config: Config, what: Controlled, reason: str = "", by: str | None = None) -> bool:
    """Write the HALT file; False if ``what`` was suspended already. ``by``: who (default:
    the user running this process)."""
    path = halt_file(config, what)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    user = by or current_user()
    record = {"by": user, "host": socket.gethostname(), "since": time.time(), "reason": reason}
    atomic_write_bytes(path, json.dumps(record).encode("utf-8"))
    return True


def resume(config: Config, what: Controlled) -> bool:
    """Remove the HALT file; False if ``what`` was not suspended."""
    path = halt_file(config, what)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


__all__ = [
    "CONTROLLED",
    "HALT",
    "Controlled",
    "current_user",
    "halt_file",
    "is_suspended",
    "resume",
    "suspend",
]
