"""Which recipients of a notification already have it, kept across retries and restarts.

One notification goes to several addresses, but the outbox retries it as a whole. So that a
retry (after a temporary refusal or a dropped connection) sends only to those still missing,
each recipient's outcome is written to a small file in the instance's state folder, named by
the notification's id, and removed when the notification is finished. Files of notifications
the outbox gave up on are removed after ``KEEP_SECONDS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mercure.fsutil import atomic_write_json, safe_component

KEEP_SECONDS = 30 * 24 * 3600.0


@dataclass
class RecipientState:
    """Outcomes so far: accepted addresses, and permanently refused ones with the reason."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)

    def settled(self, address: str) -> bool:
        return address in self.accepted or address in self.refused


class RecipientMemory:
    """Recipient outcomes per notification id, in ``folder`` (or in memory without one)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._in_memory: dict[str, RecipientState] = {}

    def _path(self, notification_id: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{safe_component(notification_id)}.json"

    def load(self, notification_id: str) -> RecipientState:
        path = self._path(notification_id)
        if path is None:
            return self._in_memory.get(notification_id, RecipientState())
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return RecipientState(list(data["accepted"]), dict(data["refused"]))
        except (OSError, ValueError, KeyError, TypeError):
            return RecipientState()  # none yet, or unreadable: sending again is the safe side

    def save(self, notification_id: str, state: RecipientState) -> None:
        path = self._path(notification_id)
        if path is None:
            self._in_memory[notification_id] = state
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"accepted": state.accepted, "refused": state.refused})

    def forget(self, notification_id: str) -> None:
        self._in_memory.pop(notification_id, None)
        path = self._path(notification_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def prune(self, now: float | None = None) -> int:
        """Remove files older than ``KEEP_SECONDS``; returns how many."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        now = time.time() if now is None else now
        removed = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.name.endswith(".json") and now - entry.stat().st_mtime > KEEP_SECONDS:
                        os.unlink(entry.path)
                        removed += 1
        return removed


__all__ = ["KEEP_SECONDS", "RecipientMemory", "RecipientState"]
