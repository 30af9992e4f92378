"""Sessions, CSRF tokens, login throttling and the HTTP headers every response carries.

Sessions live in the server's memory (a restart logs everyone out): the cookie holds only a
random id, ``HttpOnly``, ``SameSite=Strict`` and ``Secure``. Every form that changes
something carries the session's CSRF token; the login form, before there is a session, a
token bound to a random pre-login cookie by an HMAC with the server's key. A request whose
``Origin`` is another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from mercure_web_dashboard.settings import Role

SESSION_COOKIE = "mercure_session"
LOGIN_COOKIE = "mercure_login"

# Content-Security-Policy: no script at all, styles and images from this server only.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass
class Session:
    id: str
    user: str
    role: Role
    csrf: str
    via: str  # "password" or "proxy"
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


class Sessions:
    """Logged-in sessions by id, with an idle timeout and an absolute lifetime."""

    def __init__(self, idle_timeout: float, lifetime: float) -> None:
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str, role: Role, via: str = "password") -> Session:
        session = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), via)
        with self._lock:
            self._expire(time.time())
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        now = time.time()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.last_seen > self.idle_timeout or now - session.created > self.lifetime:
                del self._sessions[session_id]
                return None
            session.last_seen = now
            return session

    def end(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def end_user(self, user: str) -> None:
        """End every session of a user (removed from the users file, role changed)."""
        with self._lock:
            for sid in [s for s, v in self._sessions.items() if v.user == user]:
                del self._sessions[sid]

    def _expire(self, now: float) -> None:
        for sid, s in list(self._sessions.items()):
            if now - s.last_seen > self.idle_timeout or now - s.created > self.lifetime:
                del self._sessions[sid]


class LoginGuard:
    """Slows password guessing: after 5 failures for one user name or one address within
    15 minutes, further tries are refused until the window has passed."""

    LIMIT = 5
    WINDOW = 900.0

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(key, []) if now - t < self.WINDOW]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def blocked(self, user: str, address: str) -> bool:
        now = time.time()
        with self._lock:
            return any(
                len(self._recent(k, now)) >= self.LIMIT for k in (f"u:{user}", f"a:{address}")
            )

    def failed(self, user: str, address: str) -> None:
        now = time.time()
        with self._lock:
            for key in (f"u:{user}", f"a:{address}"):
                self._failures.setdefault(key, []).append(now)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{user}", None)


class LoginTokens:
    """CSRF tokens for the login form: HMAC(server key, pre-login cookie)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def new_cookie(self) -> str:
        return secrets.token_urlsafe(24)

    def token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode(), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        return hmac.compare_digest(self.token(cookie), token)


def same_token(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


__all__ = [
    "LOGIN_COOKIE",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "LoginGuard",
    "LoginTokens",
    "Session",
    "Sessions",
    "same_token",
]
