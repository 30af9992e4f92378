"""mercure's notification payloads, rendered exactly as mercure renders them, in one place.

For each part (webhook body, webhook payload, e-mail body) mercure first replaces the legacy
macros ``@rule@``, ``@task_id@`` and ``@event@``, then renders the text as a Jinja2 template
with ``rule``, ``task_id``, ``event`` (``RECEIVED``/``COMPLETED``/``ERROR``), ``details``,
``DeviceSerialNumber`` and, for the webhook, ``body`` (the rendered
``notification_payload_body``, escaped to sit inside a JSON string). Patient data (``acc``,
``mrn``, ``patient_name``) is real only with ``phi_notifications: true`` (a tag the series
lacks is ``MISSING``, as in mercure's task file); otherwise the webhook templates see
``UNKNOWN`` and the e-mail template sees nothing. The webhook payload is
``notification_payload`` wrapped in braces and parsed as JSON. E-mails go to each address of
the comma-separated ``notification_email`` with the subject ``[Mercure] Rule <name>: <EVENT>``.

Templates run in Jinja2's sandbox: a rule author cannot reach Python internals through them.
Notifiers call :func:`render_notification`; none re-implements it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import htmlsafe_json_dumps

from mercure.notifiers import EVENT_NAMES, Notification, NotificationEvent

if TYPE_CHECKING:
    from mercure.config import Rule

UNKNOWN = "UNKNOWN"
MISSING = "MISSING"
"""What mercure's task file holds for a patient tag the series lacks."""
_ENV = SandboxedEnvironment()


class RenderError(ValueError):
    """A template of a rule cannot be rendered; says which field and why."""


def render_template(
    text: str,
    *,
    event: NotificationEvent,
    rule_name: str,
    task_id: str,
    details: str = "",
    context: Mapping[str, Any] | None = None,
    field: str = "template",
) -> str:
    """One of mercure's notification templates: macros first, then sandboxed Jinja2."""
    event_name = EVENT_NAMES[event]
    text = text.replace("@rule@", rule_name).replace("@task_id@", task_id)
    text = text.replace("@event@", event_name)
    values = {"rule": rule_name, "task_id": task_id, "event": event_name, "details": details}
    values.update(context or {})
    try:
        return _ENV.from_string(text).render(values)
    except jinja2.TemplateError as exc:
        raise RenderError(f"{field} of rule '{rule_name}' cannot be rendered: {exc}") from None


def render_notification(
    event: NotificationEvent,
    rule_name: str,
    rule: Rule,
    task_id: str,
    *,
    details: str = "",
    patient: Mapping[str, str | None] | None = None,
    device_serial_number: str | None = None,
    phi: bool = False,
) -> Notification:
    """Render a rule's webhook and e-mail notification for one job.

    ``patient`` holds ``acc``, ``mrn`` and ``patient_name`` of the job (used only if ``phi``;
    ``None`` for a tag the series lacks).
    A template that cannot be rendered leaves that part's ``webhook_problem`` or
    ``email_problem`` set.
    """
    patient = patient or {}

    def patient_value(key: str) -> str:
        value = patient.get(key)
        return MISSING if value is None else value

    def render(text: str, context: Mapping[str, Any], field: str) -> str:
        return render_template(
            text,
            event=event,
            rule_name=rule_name,
            task_id=task_id,
            details=details,
            context=context,
            field=field,
        )

    webhook_problem: str | None = None
    email_problem: str | None = None
    webhook_url = rule.notification_webhook.strip()
    payload: Any = None
    if webhook_url:
        phi_data: dict[str, Any] = {"acc": UNKNOWN, "mrn": UNKNOWN, "patient_name": UNKNOWN}
        if phi:
            phi_data = {
                "acc": patient_value("acc"),
                "mrn": patient_value("mrn"),
                "patient_name": patient_value("patient_name"),
            }
        phi_data["DeviceSerialNumber"] = device_serial_number
        try:
            body = render(rule.notification_payload_body, phi_data, "notification_payload_body")
            context = {"body": str(htmlsafe_json_dumps(body))[1:-1], **phi_data}
            text = render(rule.notification_payload, context, "notification_payload")
            try:
                payload = json.loads("{" + text + "}")
            except json.JSONDecodeError as exc:
                raise RenderError(
                    f"notification_payload of rule '{rule_name}' is not JSON once wrapped in "
                    f"braces: {exc.msg} at column {exc.colno} of {{{text}}}"
                ) from None
        except RenderError as exc:
            webhook_problem = str(exc)
    recipients = tuple(a.strip() for a in rule.notification_email.split(",") if a.strip())
    email_body = ""
    if recipients:
        email_context: dict[str, Any] = {"DeviceSerialNumber": device_serial_number}
        if phi:
            email_context.update(
                acc=patient_value("acc"),
                mrn=patient_value("mrn"),
                patient_name=patient_value("patient_name"),
            )
        try:
            email_body = render(
                rule.notification_email_body, email_context, "notification_email_body"
            )
        except RenderError as exc:
            email_problem = str(exc)
    email_type = "html" if rule.notification_email_type.strip().lower() == "html" else "plain"
    return Notification(
        event=event,
        rule_name=rule_name,
        task_id=task_id,
        details=details,
        webhook_url=webhook_url,
        webhook_payload=payload,
        email_to=recipients,
        email_subject=f"[Mercure] Rule {rule_name}: {EVENT_NAMES[event]}",
        email_body=email_body,
        email_type=email_type,
        webhook_problem=webhook_problem,
        email_problem=email_problem,
    )


__all__ = ["MISSING", "UNKNOWN", "RenderError", "render_notification", "render_template"]
