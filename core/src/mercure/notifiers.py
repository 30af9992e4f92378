"""The contract for notifiers (webhook, e-mail, log): tell people what happened to a job.

The router and the dispatcher never call a notifier. They render a rule's notification once
(:func:`mercure.payloads.render_notification`, mercure's templates exactly), hand it to the
durable outbox on the spool and go on. The outbox worker (service ``notifier``) then calls
:meth:`Notifier.send` of each configured notifier that :meth:`Notifier.wants` it, retries with
backoff, and records "delivered" or "given up, why".

Threading: the worker calls ``send`` from one thread per process at a time, but several
processes may run workers on one spool; a notifier needs no locking of its own.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mercure.lifecycle import Plugin, SettingsT

NotificationEvent = Literal["reception", "completion", "error"]
#: mercure's names of the events, as templates see them (``{{ event }}``, ``@event@``).
EVENT_NAMES: dict[NotificationEvent, str] = {
    "reception": "RECEIVED",
    "completion": "COMPLETED",
    "error": "ERROR",
}


@dataclass(frozen=True)
class Notification:
    """One rule's notification for one job, rendered when it was queued.

    ``webhook_*`` are set when the rule has ``notification_webhook``; ``email_*`` when it has
    ``notification_email``. ``webhook_problem`` and ``email_problem`` say why that part could
    not be rendered (an invalid ``notification_payload``, a broken e-mail template): a notifier
    using that part records it as given up rather than sending garbage, while the other part
    is still sent.
    """

    event: NotificationEvent
    rule_name: str
    task_id: str
    details: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    webhook_url: str = ""
    webhook_payload: Any = None
    email_to: tuple[str, ...] = ()
    email_subject: str = ""
    email_body: str = ""
    email_type: str = "plain"
    webhook_problem: str | None = None
    email_problem: str | None = None

    @property
    def event_name(self) -> str:
        return EVENT_NAMES[self.event]

    @property
    def problem(self) -> str | None:
        """Every part's rendering problem, for a notifier that uses both parts."""
        parts = [p for p in (self.webhook_problem, self.email_problem) if p]
        return "; ".join(dict.fromkeys(parts)) or None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["email_to"] = list(self.email_to)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notification:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["email_to"] = tuple(known.get("email_to", ()))
        if data.get("problem"):  # written before the problem was kept per part
            known.setdefault("webhook_problem", data["problem"])
            known.setdefault("email_problem", data["problem"])
        return cls(**known)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


class NotificationError(Exception):
    """Sending failed for a reason worth retrying (server down, timeout, 5xx, 429)."""


class PermanentNotificationError(NotificationError):
    """Sending can never succeed as configured (404, bad credentials): given up at once."""


class Notifier(Plugin[SettingsT], ABC):
    """Delivers rendered notifications; see the module docstring for the lifecycle."""

    def wants(self, notification: Notification) -> bool:
        """Whether this notifier has something to send for ``notification`` (quick, no I/O)."""
        return True

    def problem(self, notification: Notification) -> str | None:
        """Why the part this notifier sends could not be rendered (then it is given up).

        The default takes every part's problem; a notifier that sends only the webhook or
        only the e-mail part returns that part's, so one broken template does not stop the other.
        """
        return notification.problem

    @abstractmethod
    def send(self, notification: Notification) -> str:
        """Deliver it; return a short receipt ("HTTP 200", "2 recipients accepted").

        Raise :class:`NotificationError` to be retried, :class:`PermanentNotificationError`
        to give up at once; any other exception counts as retryable.
        """


__all__ = [
    "EVENT_NAMES",
    "Notification",
    "NotificationError",
    "NotificationEvent",
    "Notifier",
    "PermanentNotificationError",
]
