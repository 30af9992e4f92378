"""What the ledger queue holds: task events and service events, as plain JSON records.

A record is written once, when the pipeline emits it, and read by every reader of the queue
(the ledger's database writer and each monitor plugin). Its ``id`` is unique, so a reader that
sees a record twice (after a crash between writing and saving its cursor) can tell.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mercure.events import TaskEvent, TaskEventType

RECORD_VERSION = 1
HOST = socket.gethostname()

Severity = Literal[0, 1, 2, 3]
"""mercure's severities: 0 info, 1 warning, 2 error, 3 critical."""


@dataclass(frozen=True)
class ServiceEvent:
    """A service started or stopped (mercure's ``mercure-event``: BOOT, SHUTDOWN, ...)."""

    service: str
    event: str
    severity: int = 0
    description: str = ""
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class LedgerRecord:
    """One entry of the ledger queue: a task event or a service event, and where it came from."""

    id: str
    kind: Literal["task", "service"]
    host: str
    pid: int
    task: TaskEvent | None = None
    service: ServiceEvent | None = None

    @property
    def time(self) -> float:
        if self.task is not None:
            return self.task.time
        assert self.service is not None
        return self.service.time

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "v": RECORD_VERSION,
            "id": self.id,
            "kind": self.kind,
            "host": self.host,
            "pid": self.pid,
        }
        if self.task is not None:
            e = self.task
            data["event"] = {
                "type": str(e.type),
                "task_id": e.task_id,
                "series_uid": e.series_uid,
                "target": e.target,
                "file_count": e.file_count,
                "info": e.info,
                "rule": e.rule,
                "tags": e.tags,
                "time": e.time,
                "extra": e.extra,
            }
        if self.service is not None:
            s = self.service
            data["event"] = {
                "service": s.service,
                "event": s.event,
                "severity": s.severity,
                "description": s.description,
                "time": s.time,
            }
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LedgerRecord:
        """Rebuild a record; ``ValueError`` if it is not one (a newer or damaged format)."""
        try:
            kind = data["kind"]
            event = data["event"]
            rid = str(data["id"])
            host = str(data.get("host", ""))
            pid = int(data.get("pid", 0))
            if kind == "task":
                try:
                    etype: TaskEventType | str = TaskEventType(event["type"])
                except ValueError:
                    etype = str(event["type"])  # a type from a newer version: keep it as text
                task = TaskEvent(
                    type=etype,  # type: ignore[arg-type,unused-ignore]
                    task_id=str(event.get("task_id", "")),
                    series_uid=str(event.get("series_uid", "")),
                    target=str(event.get("target", "")),
                    file_count=int(event.get("file_count", 0)),
                    info=str(event.get("info", "")),
                    rule=str(event.get("rule", "")),
                    tags={str(k): str(v) for k, v in (event.get("tags") or {}).items()},
                    time=float(event.get("time", 0.0)),
                    extra=dict(event.get("extra") or {}),
                )
                return cls(rid, "task", host, pid, task=task)
            if kind == "service":
                service = ServiceEvent(
                    service=str(event.get("service", "")),
                    event=str(event["event"]),
                    severity=int(event.get("severity", 0)),
                    description=str(event.get("description", "")),
                    time=float(event.get("time", 0.0)),
                )
                return cls(rid, "service", host, pid, service=service)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a ledger record: {exc}") from None
        raise ValueError(f"unknown ledger record kind {kind!r}")


TAGGED = frozenset({"route", "process", "discard", "notification"})
"""Event types whose record keeps the series' tags: the ones that create a job (the ledger
stores the tags once per job), and processing events (their results name the patient)."""


def task_record(event: TaskEvent) -> LedgerRecord:
    """The record of a task event; tags are kept only where the ledger reads them."""
    kind = str(event.type)
    if event.tags and kind not in TAGGED and not kind.startswith("process"):
        event = replace(event, tags={})
    extra_task = event.extra.get("task")
    if isinstance(extra_task, dict) and "tags" in extra_task:
        # The task file's tags are the event's own: kept once.
        event = replace(event, extra={**event.extra, "task": {k: v for k, v in extra_task.items()
                                                                if k != "tags"}})  # fmt: skip
    return LedgerRecord(uuid.uuid4().hex, "task", HOST, os.getpid(), task=event)


def service_record(event: ServiceEvent) -> LedgerRecord:
    return LedgerRecord(uuid.uuid4().hex, "service", HOST, os.getpid(), service=event)


__all__ = ["LedgerRecord", "ServiceEvent", "service_record", "task_record"]
