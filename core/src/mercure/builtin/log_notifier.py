"""The ``log`` notifier: writes every rule notification to the log.

Switched on with ``"plugins": {"notifiers": {"log": {}}}``; useful to see what the webhook and
e-mail notifiers would send.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.logs import get_logger
from mercure.notifiers import Notification, Notifier
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn

log = get_logger("mercure.notify")


class LogNotifierSettings(PluginSettings):
    """The ``log`` notifier has no settings."""


class LogNotifier(Notifier[LogNotifierSettings]):
    """Logs reception, completion and error notifications of every rule."""

    def send(self, notification: Notification) -> str:
        log.info(
            "notification",
            notification_event=notification.event,
            rule=notification.rule_name,
            task_id=notification.task_id,
            details=notification.details,
            webhook_url=notification.webhook_url or None,
            email_to=list(notification.email_to) or None,
        )
        return "logged"


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    register("log", LogNotifierSettings, LogNotifier)
