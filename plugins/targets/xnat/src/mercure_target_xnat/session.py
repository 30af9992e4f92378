"""XNAT's HTTP session: log in once (``POST /data/JSESSION``), reuse the JSESSIONID cookie
across jobs, log in again when it expired, log out (``DELETE /data/JSESSION``) at shutdown.

XNAT recommends a server-side session over credentials on every request: each
authenticated request otherwise makes a new HTTP session on the server.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from mercure.targets import PermanentTargetError, TargetError

from mercure_target_xnat.config import XnatTargetConfig

USER_AGENT = "mercure-target-xnat"
MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: httpx.Headers
    text: str

    @property
    def label(self) -> str:
        return f"HTTP {self.status} {self.reason}".strip()

    def said(self, limit: int = 300) -> str:
        """What XNAT said, short (its error pages are HTML: keep the words)."""
        words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", self.text)).strip()
        return words[:limit] + ("..." if len(words) > limit else "")


def read(response: httpx.Response) -> Answer:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            break
    text = bytes(body[:MAX_ANSWER_BYTES]).decode("utf-8", "replace")
    return Answer(response.status_code, response.reason_phrase, response.headers, text)


def describe(host: str, exc: httpx.TransportError, timeout: float) -> str:
    detail = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, httpx.ReadTimeout):
        return (
            f"XNAT at {host} did not answer within {timeout:g} s (timeout); the import may "
            "still complete there, and the retry uploads the job again"
        )
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot connect to XNAT at {host}: {detail}; check host and that XNAT runs"
    return f"the connection to XNAT at {host} broke ({exc.__class__.__name__}: {detail})"


class XnatSession:
    """One HTTP client and one JSESSION for a target, shared by its jobs (thread-safe)."""

    def __init__(self, name: str, config: XnatTargetConfig) -> None:
        self.name = name
        self.config = config
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._jsession: str | None = None
        self.logins = 0

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                context = ssl.create_default_context(cafile=self.config.ca_bundle)
                if not self.config.verify_tls:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._client = httpx.Client(
                    base_url=self.config.host,
                    headers={"User-Agent": USER_AGENT},
                    verify=context,
                    timeout=httpx.Timeout(self.config.timeout, connect=self.config.connect_timeout),
                    follow_redirects=False,
                )
            return self._client

    @property
    def credentials(self) -> httpx.BasicAuth:
        return httpx.BasicAuth(self.config.user, self.config.password)

    def _refused(self, answer: Answer, what: str) -> PermanentTargetError:
        return PermanentTargetError(
            f"XNAT at {self.config.host} refused {what} for user '{self.config.user}' "
            f"({answer.label}: {answer.said() or 'no details'}); check user and password"
        )

    def login(self, stale: str | None = None) -> str:
        """The JSESSION id, logging in if there is none (or only ``stale``, which expired)."""
        with self._lock:
            if self._jsession is not None and self._jsession != stale:
                return self._jsession
        try:
            with self.client.stream("POST", "/data/JSESSION", auth=self.credentials) as rsp:
                answer = read(rsp)
        except httpx.TransportError as exc:
            raise TargetError(describe(self.config.host, exc, self.config.timeout)) from exc
        if answer.status in (401, 403):
            raise self._refused(answer, "the login (POST /data/JSESSION)")
        session = answer.text.strip()
        if answer.status != 200 or not re.fullmatch(r"[0-9A-Za-z]{16,128}", session):
            raise TargetError(
                f"XNAT at {self.config.host} answered the login (POST /data/JSESSION) with "
                f"{answer.label} and no session id ({answer.said(120)!r}); check host"
            )
        with self._lock:
            self._jsession = session
            self.logins += 1
        return session

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: Callable[[], Iterator[bytes]] | None = None,
    ) -> Answer:
        """A request in the session; an expired session is renewed once and the request
        repeated (``body`` makes a fresh stream of the request body for each try)."""
        stale: str | None = None
        for _ in range(2):
            session = self.login(stale)
            all_headers = {**(headers or {}), "Cookie": f"JSESSIONID={session}"}
            try:
                with self.client.stream(
                    method,
                    path,
                    params=params,
                    headers=all_headers,
                    content=body() if body is not None else None,
                ) as rsp:
                    answer = read(rsp)
            except httpx.TransportError as exc:
                raise TargetError(describe(self.config.host, exc, self.config.timeout)) from exc
            if answer.status != 401:
                return answer
            stale = session  # expired or ended by an administrator: log in again
        raise self._refused(answer, f"{method} {path}")

    def check_credentials(self) -> Answer:
        """``GET /data/auth`` with the credentials (what mercure's connection test calls)."""
        try:
            with self.client.stream("GET", "/data/auth", auth=self.credentials) as rsp:
                return read(rsp)
        except httpx.TransportError as exc:
            raise TargetError(describe(self.config.host, exc, self.config.timeout)) from exc

    def close(self) -> None:
        """End the JSESSION on the server (``DELETE /data/JSESSION``), close connections."""
        with self._lock:
            client, session = self._client, self._jsession
            self._client, self._jsession = None, None
        if client is None:
            return
        try:
            if session is not None:
                client.delete("/data/JSESSION", headers={"Cookie": f"JSESSIONID={session}"})
        except httpx.HTTPError:
            pass  # the session expires on its own; nothing is lost
        finally:
            client.close()
