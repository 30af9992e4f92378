"""The durable notification outbox on the spool: queued, retried, then delivered or given up.

Layout (under ``<spool>/outbox``, the folder beside ``outgoing/``)::

    pending/<due>-<id>.json    to be sent to one notifier instance; ``due`` is when to try next
    done/<task id>/<id>.json   the record: delivered (with the receipt) or given up (with why)

An entry is written to a temporary name, fsynced and renamed, so a router killed at any point
leaves it whole or absent, never half; queuing is one small durable write, so the pipeline
never waits for a slow notifier. Workers claim an entry with an exclusive ``flock`` on it (the
kernel frees it when a worker dies) and finish it with a rename, so several processes on one
spool never send it twice concurrently; after a crash between sending and recording, it is sent
again (at least once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mercure.fsutil import atomic_write_json, fsync_dir, safe_component
from mercure.notifiers import Notification

Outcome = Literal["delivered", "given up"]


@dataclass
class OutboxEntry:
    """One notification for one notifier instance, and its tries so far."""

    notifier: str
    notification: Notification
    tries: int = 0
    errors: list[str] = field(default_factory=list)
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "notifier": self.notifier,
            "notification": self.notification.to_json(),
            "tries": self.tries,
            "errors": self.errors[-10:],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> OutboxEntry:
        return cls(
            notifier=str(data["notifier"]),
            notification=Notification.from_json(data["notification"]),
            tries=int(data.get("tries", 0)),
            errors=list(data.get("errors", [])),
            path=path,
        )


class Outbox:
    """Queue, claim, reschedule and finish notification entries."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = folder
        self.pending = folder / "pending"
        self.done = folder / "done"
        self.fsync = fsync
        for path in (self.pending, self.done):
            path.mkdir(parents=True, exist_ok=True)

    def put(self, notifier: str, notification: Notification) -> Path:
        """Queue ``notification`` for ``notifier``, durably; returns the entry's path."""
        entry = OutboxEntry(notifier, notification)
        name = f"{time.time():017.6f}-{notification.id}-{safe_component(notifier)}.json"
        path = self.pending / name
        atomic_write_json(path, entry.to_json(), fsync=self.fsync)
        return path

    def due(self, now: float | None = None) -> list[Path]:
        """Pending entries whose time has come, oldest first."""
        now = time.time() if now is None else now
        found = []
        with os.scandir(self.pending) as entries:
            for e in entries:
                if e.name.startswith(".") or not e.name.endswith(".json"):
                    continue
                with contextlib.suppress(ValueError):
                    if float(e.name.split("-", 1)[0]) <= now:
                        found.append(Path(e.path))
        return sorted(found)

    def count(self) -> int:
        with os.scandir(self.pending) as entries:
            return sum(1 for e in entries if e.name.endswith(".json") and e.name[0] != ".")

    @contextlib.contextmanager
    def claim(self, path: Path) -> Iterator[OutboxEntry | None]:
        """Hold ``path`` exclusively while it is worked on; ``None`` if taken or gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield None
                return
            if not path.exists():  # finished by the previous holder between open and lock
                yield None
                return
            try:
                data = json.loads(os.pread(fd, 1 << 24, 0))
                entry = OutboxEntry.from_json(data, path)
            except (ValueError, KeyError, TypeError):
                # Unreadable entries cannot be sent; keep them for an operator, out of the queue.
                os.replace(path, self.folder / f"unreadable-{path.name}")
                yield None
                return
            yield entry
        finally:
            os.close(fd)

    def reschedule(self, entry: OutboxEntry, error: str, delay: float) -> Path:
        """Record a failed try and move the entry to its next due time."""
        assert entry.path is not None
        entry.tries += 1
        entry.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {error}")
        rest = entry.path.name.split("-", 1)[1]
        new = self.pending / f"{time.time() + delay:017.6f}-{rest}"
        atomic_write_json(new, entry.to_json(), fsync=self.fsync)
        os.unlink(entry.path)
        if self.fsync:
            fsync_dir(self.pending)
        entry.path = new
        return new

    def finish(
        self, entry: OutboxEntry, outcome: Outcome, detail: str, *, tried: bool = True
    ) -> Path:
        """Write the record to ``done/<task id>/`` and remove the pending entry.

        ``tried``: this outcome came from a try at sending (counted in the record's ``tries``),
        not from a notification that could not be sent at all.
        """
        assert entry.path is not None
        n = entry.notification
        record = {
            **entry.to_json(),
            "outcome": outcome,
            "detail": detail,
            "finished_at": time.time(),
        }
        record["tries"] = entry.tries + (1 if tried else 0)
        folder = self.done / safe_component(n.task_id or "no-task")
        folder.mkdir(exist_ok=True)
        final = folder / f"{n.id}-{safe_component(entry.notifier)}.json"
        atomic_write_json(final, record, fsync=self.fsync)
        os.unlink(entry.path)
        if self.fsync:
            fsync_dir(self.pending)
        return final

    def records(self, task_id: str) -> list[dict[str, Any]]:
        """Finished and pending entries of one job, for ``mercure job show``."""
        found: list[dict[str, Any]] = []
        folder = self.done / safe_component(task_id)
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                with contextlib.suppress(OSError, ValueError):
                    found.append(json.loads(path.read_text()))
        for path in sorted(self.pending.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if data.get("notification", {}).get("task_id") == task_id:
                    found.append({**data, "outcome": "pending"})
        return found


def backoff(tries: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before try ``tries + 1``: doubling from ``base``, capped, ±20 % jitter."""
    delay = min(cap, base * (2 ** max(0, tries - 1)))
    return delay * (rng or random).uniform(0.8, 1.2)


__all__ = ["Outbox", "OutboxEntry", "backoff"]
