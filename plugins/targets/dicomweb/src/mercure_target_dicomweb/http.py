"""The HTTP side: one keep-alive httpx client per target, authentication, TLS, answers.

One :class:`httpx.Client` serves every job of a target (httpx's connection pool is safe to use
from several threads), so the TCP and TLS connection stays open across the batches of a job
and across jobs (HTTP/1.1 keep-alive).
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
import time
from dataclasses import dataclass

import httpx
from mercure.targets import PermanentTargetError

from mercure_target_dicomweb.config import DicomWebTargetConfig

#: Largest answer body read into memory (STOW-RS and QIDO-RS answers are small).
MAX_ANSWER_BYTES = 16 * 1024 * 1024
USER_AGENT = "mercure-target-dicomweb"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, headers and (at most :data:`MAX_ANSWER_BYTES` of) body."""

    status: int
    reason: str
    headers: httpx.Headers
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def text(self, limit: int = 300) -> str:
        """What the server said, short: its JSON message if any, else the body's text."""
        return server_text(self.body, limit)


def server_text(body: bytes, limit: int = 300) -> str:
    raw = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        parts = [
            str(data[k])
            for k in ("Message", "message", "Details", "details", "error", "errorMessage")
            if data.get(k)
        ]
        if parts:
            raw = "; ".join(dict.fromkeys(parts))
    raw = re.sub(r"<[^>]+>", " ", raw)  # an HTML error page: keep its words
    raw = re.sub(r"\s+", " ", raw).strip()
    return raw[:limit] + ("..." if len(raw) > limit else "")


def ssl_context(name: str, config: DicomWebTargetConfig) -> ssl.SSLContext:
    """The TLS settings: CA bundle (or the system's), verification, client certificate."""
    try:
        context = ssl.create_default_context(cafile=config.ca_bundle)
        if not config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if config.client_cert:
            context.load_cert_chain(
                config.client_cert, config.client_key, config.client_key_password
            )
    except (OSError, ssl.SSLError) as exc:
        raise PermanentTargetError(
            f"target '{name}': cannot use the TLS files (ca_bundle {config.ca_bundle}, "
            f"client_cert {config.client_cert}, client_key {config.client_key}): {exc}; "
            "check that they are PEM files and that client_key_password fits the key"
        ) from exc
    return context


def build_client(name: str, config: DicomWebTargetConfig) -> httpx.Client:
    """A client with the target's credentials, TLS settings and timeouts."""
    headers = {"User-Agent": USER_AGENT}
    auth: httpx.Auth | None = None
    if config.auth_kind == "basic":
        auth = httpx.BasicAuth(config.http_user or "", config.http_password or "")
    elif config.auth_kind == "bearer":
        headers["Authorization"] = f"Bearer {config.access_token}"
    return httpx.Client(
        auth=auth,
        headers=headers,
        verify=ssl_context(name, config),
        timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
        limits=httpx.Limits(max_keepalive_connections=16, keepalive_expiry=60),
        follow_redirects=False,
    )


def read_answer(response: httpx.Response) -> Answer:
    """Read a streamed response's body, at most :data:`MAX_ANSWER_BYTES` of it."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            del body[MAX_ANSWER_BYTES:]
            break
    return Answer(response.status_code, response.reason_phrase, response.headers, bytes(body))


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def tls_problem(exc: httpx.TransportError) -> str | None:
    """What to fix when ``exc`` is a certificate problem (it will not pass by itself)."""
    detail = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in detail:
        return (
            "the server's certificate is not trusted: set ca_bundle to the CA that signed it "
            "and check that the URL's host name is in the certificate"
        )
    if "CERTIFICATE_REQUIRED" in detail:
        return "the server requires a client certificate: set client_cert (and client_key)"
    if any(a in detail for a in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_ACCESS")):
        return (
            "the server refuses the client certificate: use one signed by a CA the server "
            "trusts (client_cert, client_key)"
        )
    return None


def describe_transport_error(url: str, exc: httpx.TransportError, timeout: float) -> str:
    """A network failure in words an operator can act on."""
    detail = str(exc).strip() or exc.__class__.__name__
    tls = tls_problem(exc)
    if tls is not None:
        return f"TLS with {url} failed ({detail}): {tls}"
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connecting to {url} timed out: check the address and that no firewall blocks it"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url}: {detail}; check that the server runs and the url"
    if isinstance(exc, httpx.ReadTimeout):
        return (
            f"no answer from {url} within {timeout:g} s (timeout); whether the server stored "
            "the instances is unknown, so they stay pending"
        )
    if isinstance(exc, httpx.WriteTimeout):
        return f"sending to {url} stalled for {timeout:g} s (timeout)"
    return (
        f"the connection to {url} broke ({exc.__class__.__name__}: {detail}); instances not "
        "confirmed stay pending"
    )
