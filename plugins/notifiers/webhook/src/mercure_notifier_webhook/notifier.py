"""The ``webhook`` notifier: POSTs a rule's rendered ``notification_payload`` as JSON.

One HTTP client per instance (kept-alive connections, the CA bundle loaded once). The answer
decides what the outbox does: 2xx is delivered; 4xx other than 408 and 429 will not change by
sending again, so it is given up at once with the server's answer; anything else (no
connection, a timeout, 3xx, 408, 429, 5xx) raises :class:`NotificationError` and the outbox
retries with backoff. URLs in messages are shortened so that a token in the path or query of
a webhook URL (Slack, Teams) does not end up in logs and outbox records.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

import httpx
from mercure.notifiers import (
    Notification,
    NotificationError,
    Notifier,
    PermanentNotificationError,
)
from mercure.tls_trust import client_context

from mercure_notifier_webhook.settings import WebhookSettings
from mercure_notifier_webhook.signature import sign

#: Bytes of the server's answer kept for the outbox record.
ANSWER_LIMIT = 500
#: Retryable 4xx statuses: Request Timeout and Too Many Requests.
RETRYABLE_4XX = frozenset({408, 429})

try:
    _VERSION = version("mercure-notifier-webhook")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0"
USER_AGENT = f"mercure-notifier-webhook/{_VERSION}"


class WebhookNotifier(Notifier[WebhookSettings]):
    """Sends the webhook part of a notification; see the module docstring for the outcomes."""

    _client: httpx.Client | None = None

    def start(self) -> None:
        self._client = httpx.Client(
            verify=client_context(self.settings.ca_bundle),
            timeout=httpx.Timeout(self.settings.timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def wants(self, notification: Notification) -> bool:
        return bool(notification.webhook_url)

    def problem(self, notification: Notification) -> str | None:
        return notification.webhook_problem

    def body(self, notification: Notification) -> bytes:
        """The exact bytes sent (and signed): the payload as JSON, as mercure posts it."""
        return json.dumps(notification.webhook_payload).encode("utf-8")

    def send(self, notification: Notification) -> str:
        url = notification.webhook_url
        if not url:
            raise PermanentNotificationError("the notification has no webhook URL")
        if self._client is None:
            self.start()
        assert self._client is not None
        where = shorten_url(url)
        body = self.body(notification)
        headers = {
            "Content-Type": "application/json",
            **self.settings.headers,
            "X-Mercure-Event": notification.event_name,
            "X-Mercure-Notification-Id": notification.id,
        }
        if self.settings.secret:
            headers[self.settings.signature_header] = sign(self.settings.secret, body)
        try:
            request = self._client.build_request("POST", url, content=body, headers=headers)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            raise PermanentNotificationError(
                f"webhook URL {where} is not a valid http(s) URL ({exc}); correct the rule's "
                "notification_webhook"
            ) from None
        try:
            response = self._client.send(request, stream=True)
        except httpx.UnsupportedProtocol:
            raise PermanentNotificationError(
                f"webhook URL {where} is not http or https; correct the rule's notification_webhook"
            ) from None
        except httpx.TimeoutException as exc:
            raise NotificationError(
                f"{where} did not answer within {self.settings.timeout:g} s "
                f"({exc.__class__.__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise NotificationError(f"cannot reach {where}: {_reason(exc)}") from None
        try:
            answer = _read_answer(response)
        finally:
            response.close()
        status = response.status_code
        if 200 <= status < 300:
            return f"HTTP {status}"
        text = f"{where} answered HTTP {status} {response.reason_phrase}".rstrip()
        if answer:
            text += f": {answer}"
        if status == 429 and response.headers.get("Retry-After"):
            text += f" (Retry-After: {response.headers['Retry-After']})"
        if 300 <= status < 400 and response.headers.get("Location"):
            text += f" (redirect to {shorten_url(response.headers['Location'])}: set the rule's "
            text += "notification_webhook to the final URL)"
        if 400 <= status < 500 and status not in RETRYABLE_4XX:
            raise PermanentNotificationError(text)
        raise NotificationError(text)


def _read_answer(response: httpx.Response) -> str:
    """The start of the server's answer, on one line; never more than ``ANSWER_LIMIT`` bytes."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= ANSWER_LIMIT:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    text = data[:ANSWER_LIMIT].decode(response.encoding or "utf-8", errors="replace")
    return " ".join(text.split())


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        text += (
            "; if the server's certificate is from a private CA, set "
            "webhook_certificate_location (the webhook notifier's ca_bundle) to that CA"
        )
    return text


def shorten_url(url: str) -> str:
    """``url`` without credentials, query and long path segments (which may be tokens)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<invalid URL>"
    if not parsed.host:
        return "<invalid URL>"
    port = f":{parsed.port}" if parsed.port else ""
    segments = ["…" if len(s) >= 16 else s for s in parsed.path.split("/")]
    query = "?…" if parsed.query else ""
    return f"{parsed.scheme}://{parsed.host}{port}{'/'.join(segments)}{query}"


__all__ = ["ANSWER_LIMIT", "USER_AGENT", "WebhookNotifier", "shorten_url"]
