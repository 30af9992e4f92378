"""mercure notifier plugin ``email``: a rule's ``notification_email`` over SMTP.

Installed, it registers the notifier type ``email`` through ``register_notifiers`` (entry
point ``notifier_email`` in the ``mercure`` group). Rules with ``notification_email`` switch
the instance on; ``email_notification_from`` becomes its ``from_address``.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_notifier_email.notifier import EmailNotifier, build_message
from mercure_notifier_email.settings import EmailSettings

__all__ = ["EmailNotifier", "EmailSettings", "build_message", "register_notifiers"]


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    register("email", EmailSettings, EmailNotifier)
