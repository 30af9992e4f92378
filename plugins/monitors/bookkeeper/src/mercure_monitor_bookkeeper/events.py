"""The ledger's records as the requests mercure's ``monitor`` module posts to its bookkeeper.

Each record becomes a list of :class:`Post`: endpoint, body kind (mercure posts events as
HTML form fields and tasks as JSON) and payload, with mercure's field names:

* a job created by the router: ``register-series`` (the series' tags), ``register-task``
  (``id``, ``series_uid``, ``parent_id``), ``update-task`` (the task file), then the task
  event ``REGISTER`` (and ``DISCARD`` or ``NOTIFICATION`` for those jobs);
* delivery: ``DISPATCH_COMPLETE`` per target, ``COMPLETE``; failures and retries ``ERROR``;
* processing: ``PROCESS_BEGIN``, ``PROCESS_MODULE_BEGIN``, ``PROCESS_MODULE_COMPLETE`` with
  ``processor-logs`` and ``store-processor-output`` when the run left a log or a result,
  ``PROCESS_COMPLETE``;
* notifications: ``NOTIFICATION``; service start and stop: ``mercure-event`` (``BOOT``,
  ``SHUTDOWN``).

Task events carry ``sender``, ``event``, ``file_count``, ``target``, ``info``, ``task_id``,
``timestamp`` and ``time`` like mercure's ``task_event_payload``.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Literal

from mercure.events import TaskEvent
from mercure.ledger.records import LedgerRecord
from mercure.ledger.writer import service_of

Body = Literal["form", "json"]

CREATED = ("route", "process", "discard", "notification")
# This project's event type -> mercure's task_event name.
TASK_EVENTS: dict[str, str] = {
    "dispatch": "DISPATCH_COMPLETE",
    "complete": "COMPLETE",
    "delay": "ERROR",
    "error": "ERROR",
    "dispatch_fail": "ERROR",
    "retry": "RESTART",
    "notification_sent": "NOTIFICATION",
    "notification_given_up": "NOTIFICATION",
    "process_begin": "PROCESS_BEGIN",
    "process_module_begin": "PROCESS_MODULE_BEGIN",
    "process_module_complete": "PROCESS_MODULE_COMPLETE",
    "process_complete": "PROCESS_COMPLETE",
    "process_fail": "ERROR",
}


@dataclass(frozen=True)
class Post:
    endpoint: str
    body: Body
    payload: dict[str, Any]

    def encoded(self) -> dict[str, Any]:
        """The keyword arguments of ``httpx.Client.post`` for this request."""
        if self.body == "json":
            return {"content": json.dumps(self.payload, default=str),
                    "headers": {"Content-Type": "application/json"}}  # fmt: skip
        return {"data": {k: "" if v is None else str(v) for k, v in self.payload.items()}}


def _time(t: float) -> str:
    """mercure posts ``datetime.now()``: local time, ISO format, no zone."""
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ")


def sender(service: str, appliance: str) -> str:
    return f"{service or 'mercure'}.{appliance}"


def task_event(event: TaskEvent, name: str, appliance: str, info: str | None = None) -> Post:
    return Post(
        "task-event",
        "form",
        {
            "sender": sender(service_of(event), appliance),
            "event": name,
            "file_count": event.file_count,
            "target": event.target,
            "info": event.info if info is None else info,
            "task_id": event.task_id,
            "timestamp": event.time,
            "time": _time(event.time),
        },
    )


def posts_for(record: LedgerRecord, appliance: str) -> list[Post]:
    """The bookkeeper requests for one ledger record, in the order mercure sends them."""
    if record.service is not None:
        s = record.service
        return [
            Post(
                "mercure-event",
                "form",
                {
                    "sender": sender(s.service, appliance),
                    "event": s.event,
                    "severity": s.severity,
                    "description": s.description,
                },
            )
        ]
    event = record.task
    assert event is not None
    kind = str(event.type)
    if kind in CREATED:
        return _created(event, kind, appliance)
    name = TASK_EVENTS.get(kind, kind.upper())
    found: list[Post] = []
    if kind == "process_module_complete":
        log = event.extra.get("log")
        if isinstance(log, str):
            found.append(
                Post(
                    "processor-logs",
                    "form",
                    {
                        "sender": sender("processor", appliance),
                        "task_id": event.task_id,
                        "module_name": event.target,
                        "time": _time(event.time),
                        "logs": log,
                    },
                )
            )
        result = event.extra.get("result", event.extra.get("output"))
        if result is not None:
            found.append(
                Post(
                    "store-processor-output",
                    "json",
                    {
                        "task_id": event.task_id,
                        "task_acc": event.tags.get("AccessionNumber", ""),
                        "task_mrn": event.tags.get("PatientID", ""),
                        "module": event.target,
                        "index": int(event.extra.get("step") or 0),
                        "settings": event.extra.get("settings") or {},
                        "output": result,
                    },
                )
            )
    info = event.info
    if kind == "delay":
        info = f"retry {event.extra.get('retry', '?')} scheduled: {event.info}"
    elif kind in ("notification_sent", "notification_given_up"):
        outcome = "sent" if kind == "notification_sent" else "given up"
        info = f"{event.rule}: {outcome}: {event.info}"
    found.append(task_event(event, name, appliance, info))
    return found


def _created(event: TaskEvent, kind: str, appliance: str) -> list[Post]:
    parent = event.extra.get("parent_id") or None
    task = event.extra.get("task")
    found: list[Post] = []
    if event.tags and not parent:
        found.append(Post("register-series", "form", dict(event.tags)))
    found.append(
        Post(
            "register-task",
            "json",
            {"id": event.task_id, "series_uid": event.series_uid, "parent_id": parent},
        )
    )
    if isinstance(task, dict):
        found.append(Post("update-task", "json", task))
    rule = f" (rule {event.rule})" if event.rule else ""
    found.append(task_event(event, "REGISTER", appliance, f"Registered series{rule}"))
    if kind == "discard":
        found.append(task_event(event, "DISCARD", appliance, event.info or "Discarded"))
    elif kind == "notification":
        found.append(task_event(event, "NOTIFICATION", appliance, "Notification rule"))
    return found


__all__ = ["Post", "posts_for", "sender"]
