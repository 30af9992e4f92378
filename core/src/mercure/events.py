"""Events that observers receive through the ``on_task_event`` hook."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class TaskEventType(StrEnum):
    """What happened to a job (mercure's task events, plus the router's own)."""

    REGISTERED = "register"
    ROUTED = "route"
    DISCARDED = "discard"
    DELIVERED = "dispatch"
    DELIVERY_FAILED = "dispatch_fail"
    RETRY_SCHEDULED = "delay"
    MOVED_TO_ERROR = "error"
    COMPLETED = "complete"
    QUEUED_FOR_PROCESSING = "process"
    NOTIFICATION = "notification"
    MANUAL_RETRY = "retry"
    NOTIFICATION_SENT = "notification_sent"
    NOTIFICATION_GIVEN_UP = "notification_given_up"
    # Processing (mercure's PROCESS_BEGIN, PROCESS_MODULE_BEGIN/COMPLETE, PROCESS_COMPLETE);
    # ``target`` is the module, ``extra`` has ``duration``, ``exit_code``, ``step``.
    PROCESSING_STARTED = "process_begin"
    MODULE_STARTED = "process_module_begin"
    MODULE_FINISHED = "process_module_complete"
    PROCESSING_FINISHED = "process_complete"
    PROCESSING_FAILED = "process_fail"
    # Study jobs: a series added to a study being collected (``task_id`` is the study job's,
    # ``series_uid`` the series'), and the study released (``info`` says why; ``extra`` has
    # ``study_uid``, ``series`` and ``state``, where the job went).
    STUDY_COLLECTED = "study_collect"
    STUDY_RELEASED = "study_release"
    STUDY_FORCE_REQUESTED = "study_force"
    # Operator controls from the command line (``extra`` has ``service`` / ``by``). Suspending
    # and resuming concern a service, not a job: their ``task_id`` is empty.
    SUSPENDED = "suspend"
    RESUMED = "resume"
    MANUAL_DISCARD = "manual_discard"


@dataclass(frozen=True)
class TaskEvent:
    """One step in a job's life, reported after the change is durable."""

    type: TaskEventType
    task_id: str
    series_uid: str = ""
    target: str = ""
    file_count: int = 0
    info: str = ""
    rule: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)
