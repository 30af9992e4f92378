"""Peers and helpers of the webhook notifier's tests.

* ``webhook_server``: pytest-httpserver's real HTTP server on a free loopback port.
* ``tls_webhook_server``: the same over HTTPS with a certificate from a trustme test CA
  (``certs.ca_file`` is that CA as PEM).
* ``make_notifier``: started notifiers with given settings, closed after the test.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from mercure.lifecycle import PluginContext
from mercure_notifier_webhook import WebhookNotifier, WebhookSettings
from pytest_httpserver import HTTPServer


def started_server(**kwargs: Any) -> HTTPServer:
    server = HTTPServer(host="127.0.0.1", port=kwargs.pop("port", 0), threaded=True, **kwargs)
    server.start()
    return server


@pytest.fixture(scope="session")
def _session_server() -> Iterator[HTTPServer]:
    server = started_server()
    yield server
    server.stop()


@pytest.fixture
def webhook_server(_session_server: HTTPServer) -> Iterator[HTTPServer]:
    """The session's HTTP server, with no handlers and an empty log for each test."""
    _session_server.clear()
    yield _session_server
    _session_server.clear()


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    ca_file = tmp_path / "webhook-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, ca_file)


@pytest.fixture
def tls_webhook_server(certs: Certs) -> Iterator[HTTPServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("127.0.0.1").configure_cert(context)
    server = started_server(ssl_context=context)
    yield server
    server.stop()


@pytest.fixture
def make_notifier() -> Iterator[Callable[..., WebhookNotifier]]:
    """Started webhook notifiers with the given settings, closed after the test."""
    made: list[WebhookNotifier] = []

    def make(**settings: Any) -> WebhookNotifier:
        notifier = WebhookNotifier(
            "webhook", WebhookSettings(**settings), PluginContext("notifier", "webhook")
        )
        notifier.start()
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()
