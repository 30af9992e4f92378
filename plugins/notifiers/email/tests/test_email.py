"""The e-mail notifier against a real SMTP server (aiosmtpd, started by the tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from mercure.notifiers import Notification, NotificationError, PermanentNotificationError
from mercure.testing import free_port
from mercure_notifier_email import EmailNotifier

pytestmark = pytest.mark.peer  # talks to a real SMTP server started by the tests
MakeNotifier = Callable[..., EmailNotifier]
StartServer = Callable[..., Any]
RECIPIENTS = ("a@example.org", "b@example.org", "c@example.org")


def note(*recipients: str, body: str = "Series done.\nBye", kind: str = "plain") -> Notification:
    return Notification(
        event="completion",
        rule_name="ct",
        task_id="task-1",
        email_to=recipients or RECIPIENTS,
        email_subject="[Mercure] Rule ct: COMPLETED",
        email_body=body,
        email_type=kind,
    )


def test_plain_text_one_message_per_recipient(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    notifier = make_notifier(smtp_port=server.port, from_address="Router <router@example.org>")
    notification = note(body="Séries done.\nBye")
    assert notifier.send(notification) == "3 of 3 recipients accepted"

    assert [m.rcpt_tos for m in server.mailbox.messages] == [[r] for r in RECIPIENTS]
    ids = set()
    for received, recipient in zip(server.mailbox.messages, RECIPIENTS, strict=True):
        msg = received.message
        assert received.mail_from == "router@example.org"
        assert not received.tls
        assert msg["To"] == recipient  # nobody sees the other recipients, as in mercure
        assert msg["From"] == "Router <router@example.org>"
        assert msg["Subject"] == "[Mercure] Rule ct: COMPLETED"
        assert msg["X-Mercure-Event"] == "COMPLETED"
        assert msg.get_content_type() == "text/plain"
        assert received.text == "Séries done.\nBye\n"
        assert msg["Date"]
        ids.add(msg["Message-ID"])
    assert len(ids) == 3 and all(notification.id in i for i in ids)


def test_html(smtp_server: StartServer, make_notifier: MakeNotifier) -> None:
    server = smtp_server()
    notifier = make_notifier(smtp_port=server.port)
    html = "<h1>Rule ct</h1><p>COMPLETED &amp; sent</p>"
    assert notifier.send(note("a@example.org", body=html, kind="html")).startswith("1 of 1")
    [received] = server.mailbox.messages
    assert received.message.get_content_type() == "text/html"
    assert received.text.rstrip("\n") == html
    assert received.mail_from == "mercure@mercure.mercure"  # mercure's default sender


def test_a_refused_recipient_is_named_and_the_others_get_it(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    server.mailbox.answers["b@example.org"] = ["550 5.1.1 <b@example.org>: no such user"]
    notifier = make_notifier(smtp_port=server.port)
    receipt = notifier.send(note())
    assert receipt == (
        "2 of 3 recipients accepted; refused: b@example.org (550 5.1.1 <b@example.org>: "
        "no such user)"
    )
    assert [m.rcpt_tos for m in server.mailbox.messages] == [["a@example.org"], ["c@example.org"]]


def test_every_recipient_refused_is_given_up(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    for address in RECIPIENTS:
        server.mailbox.answers[address] = ["550 5.1.1 no such user"]
    notifier = make_notifier(smtp_port=server.port)
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note())
    for address in RECIPIENTS:
        assert f"{address} (550 5.1.1 no such user)" in str(info.value)
    assert server.mailbox.messages == []


def test_a_temporary_refusal_is_retried_for_that_recipient_only(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    server.mailbox.answers["b@example.org"] = ["450 4.2.1 mailbox busy, try later"]
    notifier = make_notifier(smtp_port=server.port)
    notification = note()
    with pytest.raises(NotificationError) as info:
        notifier.send(notification)
    assert not isinstance(info.value, PermanentNotificationError)
    assert "b@example.org (450 4.2.1 mailbox busy, try later)" in str(info.value)
    assert "a@example.org, c@example.org already have it" in str(info.value)

    # The outbox's retry, by a notifier started anew (as after a restart): only b is left.
    again = make_notifier(smtp_port=server.port)
    assert again.send(notification) == "3 of 3 recipients accepted"
    assert [m.rcpt_tos for m in server.mailbox.messages] == [
        ["a@example.org"],
        ["c@example.org"],
        ["b@example.org"],
    ]


def test_no_server_is_retried(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier(smtp_port=free_port())
    with pytest.raises(NotificationError) as info:
        notifier.send(note())
    assert not isinstance(info.value, PermanentNotificationError)
    assert "cannot reach SMTP server 127.0.0.1:" in str(info.value)


def test_starttls_with_the_test_ca_and_login(
    smtp_server: StartServer, make_notifier: MakeNotifier, certs: Any
) -> None:
    server = smtp_server(
        login=True, tls_context=certs.server_context, require_starttls=True, auth_require_tls=True
    )
    notifier = make_notifier(
        smtp_port=server.port,
        starttls=True,
        ca_bundle=str(certs.ca_file),
        username="mercure",
        password="correct horse",
    )
    assert notifier.send(note("a@example.org", "b@example.org")) == "2 of 2 recipients accepted"
    assert [(m.tls, m.authenticated) for m in server.mailbox.messages] == [(True, True)] * 2


def test_starttls_with_an_untrusted_certificate_is_retried_with_a_hint(
    smtp_server: StartServer, make_notifier: MakeNotifier, certs: Any
) -> None:
    server = smtp_server(tls_context=certs.server_context, require_starttls=True)
    notifier = make_notifier(smtp_port=server.port, starttls=True)
    with pytest.raises(NotificationError) as info:
        notifier.send(note())
    assert not isinstance(info.value, PermanentNotificationError)
    assert "not trusted" in str(info.value) and "ca_bundle" in str(info.value)
    assert server.mailbox.messages == []


def test_implicit_tls(smtp_server: StartServer, make_notifier: MakeNotifier, certs: Any) -> None:
    server = smtp_server(ssl_context=certs.server_context)
    notifier = make_notifier(smtp_port=server.port, implicit_tls=True, ca_bundle=str(certs.ca_file))
    assert notifier.send(note("a@example.org")) == "1 of 1 recipients accepted"
    [received] = server.mailbox.messages
    assert received.tls


def test_a_wrong_password_is_given_up(
    smtp_server: StartServer, make_notifier: MakeNotifier, certs: Any
) -> None:
    server = smtp_server(login=True, tls_context=certs.server_context, auth_require_tls=True)
    notifier = make_notifier(
        smtp_port=server.port,
        starttls=True,
        ca_bundle=str(certs.ca_file),
        username="mercure",
        password="wrong",
    )
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note())
    assert "refused the login of mercure: 535" in str(info.value)
    assert server.mailbox.messages == []


def test_login_required_but_not_configured_is_given_up(
    smtp_server: StartServer, make_notifier: MakeNotifier, certs: Any
) -> None:
    server = smtp_server(login=True, tls_context=certs.server_context, auth_require_tls=True)
    notifier = make_notifier(smtp_port=server.port, starttls=True, ca_bundle=str(certs.ca_file))
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note())
    assert "refused the sender mercure@mercure.mercure: 530" in str(info.value)


def test_starttls_not_offered_is_given_up(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    notifier = make_notifier(smtp_port=server.port, starttls=True)
    with pytest.raises(PermanentNotificationError, match="does not offer STARTTLS"):
        notifier.send(note())


def test_login_not_offered_is_given_up_with_a_hint(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()  # offers AUTH only over TLS, as aiosmtpd does by default
    notifier = make_notifier(smtp_port=server.port, username="mercure", password="x")
    with pytest.raises(PermanentNotificationError) as info:
        notifier.send(note())
    assert "offers no login (AUTH)" in str(info.value) and "STARTTLS" in str(info.value)


def test_an_address_with_a_line_break_is_refused_not_injected(
    smtp_server: StartServer, make_notifier: MakeNotifier
) -> None:
    server = smtp_server()
    notifier = make_notifier(smtp_port=server.port)
    receipt = notifier.send(note("a@example.org", "b@example.org\r\nBcc: x@example.org"))
    assert receipt.startswith("1 of 2 recipients accepted; refused: b@example.org")
    assert [m.rcpt_tos for m in server.mailbox.messages] == [["a@example.org"]]


def test_wants_only_notifications_with_recipients(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier()
    assert notifier.wants(note("a@example.org"))
    assert not notifier.wants(Notification("completion", "ct", "t"))


def test_only_a_broken_email_part_stops_it(make_notifier: MakeNotifier) -> None:
    notifier = make_notifier()
    message = note("a@example.org")
    assert notifier.problem(replace(message, webhook_problem="payload is not JSON")) is None
    broken = replace(message, email_problem="template cannot be rendered")
    assert notifier.problem(broken) == "template cannot be rendered"
