"""The ``log`` notifier: writes every rule notification to the log."""

from __future__ import annotations

from mercure import hookimpl
from mercure.logs import get_logger
from mercure.notifiers import Notification, Notifier
from mercure.registry import RegisterFn

log = get_logger("mercure.notify")


class LogNotifier(Notifier):
    """Logs reception, completion and error notifications of every rule."""

    def notify(self, notification: Notification) -> None:
        log.info(
            "notification",
            notification_event=notification.event,
            rule=notification.rule_name,
            task_id=notification.task_id,
            details=notification.details,
        )


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    register("log", None, LogNotifier)
