"""A notifier plugin to copy and rename: appends each notification to a JSON-lines file.

Configured as ``"plugins": {"notifiers": {"template": {"path": "/var/log/mercure-notes.jsonl"}}}``.
It shows the whole notifier contract: a settings model (unknown keys are errors), ``wants``
(quick, no I/O: which notifications concern this notifier), ``send`` returning a receipt,
``NotificationError`` to be retried and ``PermanentNotificationError`` to give up at once,
and ``start``/``close`` for what the notifier holds open.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Literal

from mercure import hookimpl
from mercure.notifiers import (
    Notification,
    NotificationError,
    Notifier,
    PermanentNotificationError,
)
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn


class TemplateNotifierSettings(PluginSettings):
    """Settings of one ``template`` notifier instance."""

    path: str
    """The JSON-lines file; its folder must exist."""
    events: list[Literal["reception", "completion", "error"]] = ["reception", "completion", "error"]
    """Which events this notifier writes."""


class TemplateNotifier(Notifier[TemplateNotifierSettings]):
    """Writes one JSON line per notification (the rendered webhook payload and e-mail)."""

    def start(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.settings.path))
        if not os.path.isdir(folder):
            raise PermanentNotificationError(f"folder {folder} of {self.settings.path} is missing")
        self._lock = threading.Lock()
        self._fd: int | None = os.open(
            self.settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640
        )

    def wants(self, notification: Notification) -> bool:
        return notification.event in self.settings.events

    def send(self, notification: Notification) -> str:
        line = json.dumps(
            {
                "id": notification.id,
                "event": notification.event_name,
                "rule": notification.rule_name,
                "task_id": notification.task_id,
                "details": notification.details,
                "webhook_payload": notification.webhook_payload,
                "email_subject": notification.email_subject,
            },
            sort_keys=True,
        )
        if self._fd is None:
            raise NotificationError("the notifier is closed")
        try:
            with self._lock:
                os.write(self._fd, (line + "\n").encode("utf-8"))  # one write: never torn
                os.fsync(self._fd)
        except OSError as exc:  # a full disk may pass: try again later
            raise NotificationError(f"cannot write {self.settings.path}: {exc.strerror}") from exc
        return f"written to {self.settings.path}"

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    """Add the ``template`` notifier type."""
    register("template", TemplateNotifierSettings, TemplateNotifier)
