"""mercure notifier plugin ``webhook``: a rule's ``notification_webhook`` as a JSON POST.

Installed, it registers the notifier type ``webhook`` through ``register_notifiers`` (entry
point ``notifier_webhook`` in the ``mercure`` group). Rules with ``notification_webhook``
switch the instance on; ``webhook_certificate_location`` becomes its ``ca_bundle``.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_notifier_webhook.notifier import WebhookNotifier
from mercure_notifier_webhook.settings import WebhookSettings
from mercure_notifier_webhook.signature import SIGNATURE_PREFIX, sign, verify

__all__ = [
    "SIGNATURE_PREFIX",
    "WebhookNotifier",
    "WebhookSettings",
    "register_notifiers",
    "sign",
    "verify",
]


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    register("webhook", WebhookSettings, WebhookNotifier)
