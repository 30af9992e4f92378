"""The ``recorder`` of the router and study tests: task events, and a notifier type to queue for."""

from __future__ import annotations

import json
from typing import Any

from mercure import hookimpl
from mercure.events import TaskEvent, TaskEventType
from mercure.notifiers import Notification, Notifier
from mercure.registry import RegisterFn
from mercure.services.runtime import Runtime


class RecordingNotifier(Notifier[Any]):
    def send(self, notification: Notification) -> str:
        return "recorded"


class Recorder:
    """Records task events (an observer) and provides a notifier type the rules can queue for."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []
        self.notifier = RecordingNotifier

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        self.events.append(event)

    @hookimpl
    def register_notifiers(self, register: RegisterFn) -> None:
        register("recording", None, self.notifier)

    def of(self, kind: TaskEventType) -> list[TaskEvent]:
        return [e for e in self.events if e.type == kind]

    @staticmethod
    def notified(rt: Runtime, event: str) -> list[str]:
        """Rules whose ``event`` notification the router queued in the outbox."""
        entries = [json.loads(p.read_text()) for p in rt.outbox.due(now=float("inf"))]
        return [
            e["notification"]["rule_name"] for e in entries if e["notification"]["event"] == event
        ]
