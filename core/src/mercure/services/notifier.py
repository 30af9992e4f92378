"""The ``notifier`` service: delivers the outbox's notifications through the rules' notifiers.

Retries with exponential backoff (``notification_retry_delay`` doubling up to 10 minutes) until
``notification_retries`` tries failed, then records "given up" with every reason. A notifier
that hangs or raises only delays other notifications, never a job.
"""

from __future__ import annotations

import time
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.metrics import Metric
from mercure.notifiers import PermanentNotificationError
from mercure.outbox import OutboxEntry, backoff
from mercure.services.base import Service
from mercure.services.runtime import Runtime

RETRY_CAP = 600.0
NAME = "notifier"


class NotifierService(Service):
    name = NAME

    def __init__(self, runtime: Runtime, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.runtime = runtime

    def run_once(self) -> int:
        outbox = self.runtime.outbox
        handled = 0
        for path in outbox.due():
            if self.stop_event.is_set():
                break
            with outbox.claim(path) as entry:
                if entry is None:
                    continue
                self.deliver(entry)
                handled += 1
        return handled

    def deliver(self, entry: OutboxEntry) -> None:
        """One try at one entry (claimed by the caller)."""
        note = entry.notification
        log = self.log.bind(task_id=note.task_id, rule=note.rule_name, notifier=entry.notifier)
        try:
            notifier = self.runtime.notifier(entry.notifier)
        except KeyError:
            reason = f"notifier '{entry.notifier}' is not configured"
            self._finish(entry, "given up", reason, tried=False)
            return
        except Exception as exc:
            # A notifier that cannot start (its server unknown yet, ...) is a failed try: the
            # entry is retried and finally given up, never stuck in the queue uncounted.
            reason = f"{exc}".strip() or exc.__class__.__name__
            self._failed(entry, f"notifier '{entry.notifier}' did not start: {reason}", log)
            return
        problem = notifier.problem(note)
        if problem:
            self._finish(entry, "given up", problem, tried=False)
            return
        try:
            receipt = notifier.send(note)
        except PermanentNotificationError as exc:
            self._finish(entry, "given up", f"{exc}".strip() or exc.__class__.__name__)
            return
        except Exception as exc:
            self._failed(entry, f"{exc}".strip() or exc.__class__.__name__, log)
            return
        self._finish(entry, "delivered", receipt or "sent")

    def _failed(self, entry: OutboxEntry, reason: str, log: Any) -> None:
        """A retryable failure: reschedule with backoff, or give up after the last try."""
        config = self.runtime.config
        self.runtime.metrics(
            Metric("notifications.failures", 1, {"notifier": entry.notifier}, service=NAME)
        )
        if entry.tries + 1 >= config.notification_retries:
            tries = entry.tries + 1
            entry.errors.append(reason)
            self._finish(entry, "given up", f"gave up after {tries} tries: {reason}")
            return
        delay = backoff(entry.tries + 1, config.notification_retry_delay, RETRY_CAP)
        self.runtime.outbox.reschedule(entry, reason, delay)
        log.warning("notification failed; will retry", in_seconds=round(delay, 1), error=reason)

    def _finish(self, entry: OutboxEntry, outcome: str, detail: str, *, tried: bool = True) -> None:
        note = entry.notification
        self.runtime.outbox.finish(
            entry, "delivered" if outcome == "delivered" else "given up", detail, tried=tried
        )
        kind = (
            TaskEventType.NOTIFICATION_SENT
            if outcome == "delivered"
            else TaskEventType.NOTIFICATION_GIVEN_UP
        )
        level = self.log.info if outcome == "delivered" else self.log.error
        level(
            f"notification {outcome}",
            task_id=note.task_id,
            rule=note.rule_name,
            notifier=entry.notifier,
            notification_event=note.event,
            detail=detail,
        )
        self.runtime.emit(
            TaskEvent(
                kind,
                note.task_id,
                target=entry.notifier,
                info=f"{note.event}: {detail}",
                rule=note.rule_name,
                time=time.time(),
                extra={"notification_id": note.id, "tries": entry.tries + (1 if tried else 0)},
            )
        )


__all__ = ["NotifierService"]
