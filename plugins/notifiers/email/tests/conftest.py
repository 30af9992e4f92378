"""Peers and helpers of the e-mail notifier's tests.

* ``smtp_server``: starts aiosmtpd's real SMTP server (in this process, on a free loopback
  port) with chosen options: STARTTLS, implicit TLS, required login; its ``Mailbox`` keeps
  every message and can refuse chosen recipients.
* ``certs``: a trustme test CA and a server certificate for 127.0.0.1.
* ``make_notifier``: started e-mail notifiers with given settings, closed after the test.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from mercure.lifecycle import PluginContext
from mercure.testing import free_port
from mercure_notifier_email import EmailNotifier, EmailSettings

USER, PASSWORD = "mercure", "correct horse"


@dataclass
class Received:
    """One message as the server got it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    authenticated: bool

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def text(self) -> str:
        """The decoded body, with the wire's CRLF line ends as LF."""
        return str(self.message.get_content()).replace("\r\n", "\n")


@dataclass
class Mailbox:
    """aiosmtpd handler: keeps messages; ``answers[address]`` scripts its next RCPT answers."""

    messages: list[Received] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        scripted = self.answers.get(address)
        answer = scripted.pop(0) if scripted else "250 OK"
        if answer.startswith("250"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        self.messages.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                content,
                session.ssl is not None or _on_tls(server),
                bool(session.authenticated),
            )
        )
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.rcpt_tos]


def _on_tls(server: SMTP) -> bool:
    """Implicit TLS: the connection itself is TLS (``session.ssl`` is set only by STARTTLS)."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login == USER.encode()
        and data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


@dataclass
class SMTPServer:
    mailbox: Mailbox
    port: int
    controller: Controller


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    server_context: ssl.SSLContext


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    ca_file = tmp_path / "smtp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return Certs(ca, ca_file, context)


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., SMTPServer]]:
    """Start aiosmtpd servers with the given ``Controller`` options; stopped after the test."""
    started: list[Controller] = []

    def start(*, login: bool = False, **options: Any) -> SMTPServer:
        mailbox = Mailbox()
        if login:
            options.update(auth_required=True, authenticator=authenticate)
        controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), **options)
        controller.start()
        started.append(controller)
        return SMTPServer(mailbox, controller.port, controller)

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def make_notifier(tmp_path: Path) -> Iterator[Callable[..., EmailNotifier]]:
    made: list[EmailNotifier] = []

    def make(**settings: Any) -> EmailNotifier:
        settings.setdefault("smtp_host", "127.0.0.1")
        settings.setdefault("timeout", 10)
        context = PluginContext("notifier", "email", state_folder=tmp_path / "email-state")
        notifier = EmailNotifier("email", EmailSettings(**settings), context)
        notifier.start()
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()
