"""The webhook notifier against a real HTTP server (pytest-httpserver): answers and outcomes."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from mercure.notifiers import Notification, NotificationError, PermanentNotificationError
from mercure.testing import free_port
from mercure_notifier_webhook import WebhookNotifier, verify
from mercure_notifier_webhook.notifier import shorten_url
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

pytestmark = pytest.mark.peer  # talks to a real HTTP server started by the tests
MakeNotifier = Callable[..., WebhookNotifier]


def note(url: str, payload: Any = None) -> Notification:
    return Notification(
        event="completion",
        rule_name="ct",
        task_id="task-1",
        webhook_url=url,
        webhook_payload={"a": 1} if payload is None else payload,
    )


PAYLOAD = {"event": "COMPLETED", "rule": "ct", "text": 'Ünïcode "quoted"\nline'}


def test_posts_the_payload_as_json_and_says_which_status(
    webhook_server: HTTPServer, make_notifier: MakeNotifier
) -> None:
    webhook_server.expect_request(
        "/hook", method="POST", json=PAYLOAD, headers={"Content-Type": "application/json"}
    ).respond_with_data("", status=204)
    notifier = make_notifier()
    receipt = notifier.send(note(webhook_server.url_for("/hook"), PAYLOAD))
    assert receipt == "HTTP 204"
    (request, _), *rest = webhook_server.log
    assert rest == []
    assert request.headers["X-Mercure-Event"] == "COMPLETED"
    assert request.headers["User-Agent"].startswith("mercure-notifier-webhook/")
    assert json.loads(request.get_data()) == PAYLOAD


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 422])
def test_a_client_error_is_given_up_at_once_with_the_answer(
    webhook_server: HTTPServer, status: int, make_notifier: MakeNotifier
) -> None:
    webhook_server.expect_request("/hook").respond_with_data(
        f"no such hook\n(code {status})", status=status
    )
    notifier = make_notifier()
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note(webhook_server.url_for("/hook")))
    assert f"answered HTTP {status}" in str(info.value)
    assert f"no such hook (code {status})" in str(info.value)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 301, 307])
def test_other_answers_are_retried(
    webhook_server: HTTPServer, status: int, make_notifier: MakeNotifier
) -> None:
    headers = {"Retry-After": "30"} if status == 429 else {}
    if status in (301, 307):
        headers["Location"] = webhook_server.url_for("/elsewhere")
    webhook_server.expect_request("/hook").respond_with_data("busy", status=status, headers=headers)
    notifier = make_notifier()
    with pytest.raises(NotificationError) as info:
        notifier.send(note(webhook_server.url_for("/hook")))
    assert not isinstance(info.value, PermanentNotificationError)
    assert f"answered HTTP {status}" in str(info.value)
    if status == 429:
        assert "Retry-After: 30" in str(info.value)
    if status in (301, 307):
        assert "redirect to" in str(info.value)
    assert len(webhook_server.log) == 1  # redirects are not followed


def test_a_long_answer_is_cut(webhook_server: HTTPServer, make_notifier: MakeNotifier) -> None:
    webhook_server.expect_request("/hook").respond_with_data("x" * 100_000, status=404)
    notifier = make_notifier()
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note(webhook_server.url_for("/hook")))
    assert "x" * 500 in str(info.value)
    assert "x" * 501 not in str(info.value)


def test_no_server_is_retried(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(timeout=5)
    url = f"http://127.0.0.1:{free_port()}/hook"
    with pytest.raises(NotificationError) as info:
        notifier.send(note(url))
    assert not isinstance(info.value, PermanentNotificationError)
    assert "cannot reach http://127.0.0.1:" in str(info.value)


def test_a_server_that_does_not_answer_in_time_is_retried(
    webhook_server: HTTPServer, make_notifier: MakeNotifier
) -> None:
    def slow(request: Request) -> Response:
        time.sleep(1.5)
        return Response("late", status=200)

    webhook_server.expect_request("/hook").respond_with_handler(slow)
    notifier = make_notifier(timeout=0.2)
    with pytest.raises(NotificationError) as info:
        notifier.send(note(webhook_server.url_for("/hook")))
    assert not isinstance(info.value, PermanentNotificationError)
    assert "did not answer within 0.2 s" in str(info.value)


def test_a_url_that_is_not_http_is_given_up(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier()
    with pytest.raises(PermanentNotificationError, match="is not http or https"):
        notifier.send(note("ftp://127.0.0.1/hook"))


def test_the_signature_verifies_over_the_exact_body(
    webhook_server: HTTPServer, monkeypatch: pytest.MonkeyPatch, make_notifier: MakeNotifier
) -> None:
    """A receiver recomputes HMAC-SHA256 over the raw body: the README's recipe, by hand."""
    monkeypatch.setenv("HOOK_SECRET", "s3cr3t-ä")
    received: list[tuple[bytes, str]] = []

    def record(request: Request) -> Response:
        received.append((request.get_data(), request.headers.get("X-Mercure-Signature", "")))
        return Response("ok")

    webhook_server.expect_request("/hook").respond_with_handler(record)
    notifier = make_notifier(secret="${env:HOOK_SECRET}")
    notifier.send(note(webhook_server.url_for("/hook"), PAYLOAD))
    [(body, header)] = received
    expected = hmac.new("s3cr3t-ä".encode(), body, hashlib.sha256).hexdigest()
    assert header == f"sha256={expected}"
    assert verify("s3cr3t-ä", body, header)
    assert not verify("another secret", body, header)
    assert not verify("s3cr3t-ä", body + b" ", header)
    assert json.loads(body) == PAYLOAD


def test_no_signature_without_a_secret_and_own_header_name(
    webhook_server: HTTPServer, make_notifier: MakeNotifier
) -> None:
    webhook_server.expect_request("/hook").respond_with_data("ok")
    plain = make_notifier()
    plain.send(note(webhook_server.url_for("/hook")))
    named = make_notifier(secret="k", signature_header="X-Signature")
    named.send(note(webhook_server.url_for("/hook")))
    (first, _), (second, _) = webhook_server.log
    assert "X-Mercure-Signature" not in first.headers
    assert "X-Signature" not in first.headers
    assert verify("k", second.get_data(), second.headers["X-Signature"])


def test_extra_headers_are_sent_and_may_be_secret_references(
    webhook_server: HTTPServer, monkeypatch: pytest.MonkeyPatch, make_notifier: MakeNotifier
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "Bearer abc123")
    webhook_server.expect_request(
        "/hook", headers={"Authorization": "Bearer abc123", "X-Site": "radiology"}
    ).respond_with_data("ok")
    notifier = make_notifier(headers={"Authorization": "${env:HOOK_TOKEN}", "X-Site": "radiology"})
    assert notifier.send(note(webhook_server.url_for("/hook"))) == "HTTP 200"


def test_the_notification_id_is_sent_and_stays_the_same_on_a_retry(
    webhook_server: HTTPServer, make_notifier: MakeNotifier
) -> None:
    """The outbox delivers at least once: a receiver can drop a repeat by this id."""
    webhook_server.expect_ordered_request("/hook").respond_with_data("", status=503)
    webhook_server.expect_ordered_request("/hook").respond_with_data("", status=200)
    notifier = make_notifier()
    notification = note(webhook_server.url_for("/hook"))
    with pytest.raises(NotificationError):
        notifier.send(notification)
    assert notifier.send(notification) == "HTTP 200"
    ids = [r.headers["X-Mercure-Notification-Id"] for r, _ in webhook_server.log]
    assert ids == [notification.id, notification.id]


def test_https_with_the_ca_bundle_and_without(
    tls_webhook_server: HTTPServer, certs: Any, make_notifier: MakeNotifier
) -> None:
    tls_webhook_server.expect_request("/hook").respond_with_data("ok")
    url = tls_webhook_server.url_for("/hook")
    assert url.startswith("https://127.0.0.1:")
    trusting = make_notifier(ca_bundle=str(certs.ca_file))
    assert trusting.send(note(url)) == "HTTP 200"
    default = make_notifier()
    with pytest.raises(NotificationError) as info:
        default.send(note(url))
    assert not isinstance(info.value, PermanentNotificationError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert "webhook_certificate_location" in str(info.value)
    assert len(tls_webhook_server.log) == 1


def test_wants_only_notifications_with_a_webhook(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier()
    assert notifier.wants(note("http://127.0.0.1:1/x"))
    assert not notifier.wants(note(""))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.org/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX",
         "https://hooks.example.org/services/T000/B000/…"),
        ("http://user:pw@127.0.0.1:8080/hook?token=abc", "http://127.0.0.1:8080/hook?…"),
        ("not a url", "<invalid URL>"),
    ],
)  # fmt: skip
def test_urls_in_messages_carry_no_tokens(url: str, shown: str) -> None:
    assert shorten_url(url) == shown


def test_sends_after_the_server_comes_back(make_notifier: MakeNotifier) -> None:
    """A kept-alive connection to a server that went away is not an error of its own."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    server.expect_request("/hook").respond_with_data("ok")
    notifier = make_notifier()
    url = server.url_for("/hook")
    assert notifier.send(note(url)) == "HTTP 200"
    port = server.port
    server.stop()
    with pytest.raises(NotificationError):
        notifier.send(note(url))
    again = HTTPServer(host="127.0.0.1", port=port, threaded=True)
    again.expect_request("/hook").respond_with_data("back")
    again.start()
    try:
        assert notifier.send(note(url)) == "HTTP 200"
    finally:
        again.stop()


def test_only_a_broken_webhook_part_stops_it(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier()
    url = "http://127.0.0.1:9/hook"
    assert notifier.problem(replace(note(url), email_problem="bad e-mail template")) is None
    broken = replace(note(url), webhook_problem="payload is not JSON")
    assert notifier.problem(broken) == "payload is not JSON"
