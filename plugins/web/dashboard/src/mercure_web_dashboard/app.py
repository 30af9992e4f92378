"""The dashboard's ASGI application: login, roles, CSRF, error pages, secret redaction.

Every page needs a login; every POST needs the CSRF token of its session (or of the login
form); actions need the operator role, checked here on the server whatever the page showed.
Errors are pages that say what went wrong and what to do, never a stack trace; the full
exception goes to the log with an incident number. The outermost layer removes every secret
of the configuration from every response body.
"""

from __future__ import annotations

import json
import secrets as _secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from mercure.cli.history import stamp
from mercure.logs import get_logger
from mercure.services.runtime import Runtime
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercure_web_dashboard.masking import MASK, mask_phi, redact, secret_values
from mercure_web_dashboard.queries import Ledger
from mercure_web_dashboard.security import (
    LOGIN_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    LoginGuard,
    LoginTokens,
    Session,
    Sessions,
    same_token,
)
from mercure_web_dashboard.settings import Role, WebSettings
from mercure_web_dashboard.users import UsersFile, UsersFileError

HERE = Path(__file__).parent
log = get_logger("mercure.web")
MAX_UPLOAD = 64 * 1024 * 1024


class LoginRequired(Exception):
    """The request has no valid session."""


class Refused(Exception):
    """The request is not allowed (role, CSRF): answered 403 with the reason."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Dashboard:
    """Everything the views share: the router's runtime, the ledger, users and sessions."""

    runtime: Runtime
    settings: WebSettings
    source: str = ""
    users: UsersFile = field(init=False)
    sessions: Sessions = field(init=False)
    guard: LoginGuard = field(default_factory=LoginGuard)
    login_tokens: LoginTokens = field(default_factory=LoginTokens)
    ledger: Ledger = field(init=False)
    secrets: set[str] = field(init=False)
    templates: Environment = field(init=False)

    def __post_init__(self) -> None:
        config = self.runtime.config
        self.users = UsersFile(self.settings.users_path(config))
        self.sessions = Sessions(self.settings.session_idle_timeout, self.settings.session_lifetime)
        self.ledger = Ledger(config)
        self.secrets = secret_values(config)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["stamp"] = stamp
        self.templates.filters["ago"] = _ago
        self.templates.filters["pretty"] = _pretty
        self.templates.globals["MASK"] = MASK

    @property
    def config(self) -> Any:
        return self.runtime.config

    def can_see_phi(self, session: Session) -> bool:
        return session.role in self.settings.patient_data_roles

    # -- sessions ------------------------------------------------------------------------------

    def session_of(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        header = self.settings.trusted_header
        if not header:
            return session
        client = request.client.host if request.client else ""
        proxied = request.headers.get(header, "").strip()
        if not proxied or client not in self.settings.trusted_proxies:
            return session if session and session.via == "password" else None
        if session is not None and session.user == proxied:
            return session
        user = self.users.get(proxied)
        role: Role = user.role if user else self.settings.header_role
        created = self.sessions.create(proxied, role, via="proxy")
        request.state.new_session = created
        return created

    def require(self, request: Request, role: Role = "viewer") -> Session:
        session = self.session_of(request)
        if session is None:
            raise LoginRequired()
        user = self.users.get(session.user) if session.via == "password" else None
        if session.via == "password" and (user is None or user.role != session.role):
            self.sessions.end_user(session.user)  # removed from the users file or role changed
            raise LoginRequired()
        if role == "operator" and session.role != "operator":
            raise Refused(
                f"user '{session.user}' has the role {session.role}; this action needs an "
                "operator (ask an administrator: mercure web user add NAME --role operator)"
            )
        request.state.session = session
        return session

    async def form(self, request: Request, session: Session | None) -> Any:
        """The request's form, after checking its origin and CSRF token."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            raise Refused(f"a form from another site ({origin}) was refused")
        try:
            form = await request.form(max_files=4, max_fields=200, max_part_size=MAX_UPLOAD)
        except Exception as exc:
            raise Refused(f"the form could not be read: {exc}", 400) from None
        token = form.get("csrf")
        if session is not None:
            ok = same_token(session.csrf, token if isinstance(token, str) else None)
        else:
            cookie = request.cookies.get(LOGIN_COOKIE)
            ok = self.login_tokens.check(cookie, token if isinstance(token, str) else None)
        if not ok:
            raise Refused(
                "the form's security token is missing or does not match this session (it may "
                "have expired): reload the page and send it again"
            )
        return form

    # -- rendering -----------------------------------------------------------------------------

    def render(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> HTMLResponse:
        session: Session | None = getattr(request.state, "session", None)
        phi = self.can_see_phi(session) if session else False
        body = self.templates.get_template(name).render(
            request=request,
            session=session,
            csrf=session.csrf if session else "",
            phi=phi,
            show=lambda value: value if phi else (MASK if value else value),
            masked=lambda value: mask_phi(value, phi),
            appliance=self.config.appliance_name,
            path=request.url.path,
            now=time.time(),
            **context,
        )
        response = HTMLResponse(body, status_code=status)
        new: Session | None = getattr(request.state, "new_session", None)
        if new is not None:
            self.set_session_cookie(response, new)
        return response

    def set_session_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=self.settings.session_lifetime,
            httponly=True,
            secure=self.settings.secure_cookies,
            samesite="strict",
            path="/",
        )

    def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        try:
            return self.render(
                request, "error.html", {"title": title, "message": message}, status=status
            )
        except Exception:  # the error page itself failed: plain text, still no trace
            return HTMLResponse(f"<h1>{status} {title}</h1>", status_code=status)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _ago(t: float | None) -> str:
    if not t:
        return "never"
    seconds = max(0, int(time.time() - float(t)))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


# -- the application ---------------------------------------------------------------------------


def create_app(runtime: Runtime, settings: WebSettings, source: str = "") -> ASGIApp:
    """The dashboard for ``runtime``'s router, wrapped so no response carries a secret."""
    from mercure_web_dashboard import views_admin, views_jobs, views_studies

    dash = Dashboard(runtime, settings, source)

    async def login_required(request: Request, exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            return dash.error_page(
                request, 401, "Login needed", "Your session has ended: log in and try again."
            )
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    async def refused(request: Request, exc: Exception) -> Response:
        status = exc.status if isinstance(exc, Refused) else 403
        return dash.error_page(request, status, "Not allowed", str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        titles = {404: "Not found", 405: "Method not allowed"}
        message = {
            404: "There is no page at this address. Use the menu above.",
            405: "This address does not take that kind of request.",
        }.get(status, "The request could not be served.")
        if status == 404 and getattr(exc, "detail", None) not in (None, "Not Found"):
            message = str(getattr(exc, "detail", ""))
        return dash.error_page(request, status, titles.get(status, "Error"), message)

    async def users_file_error(request: Request, exc: Exception) -> Response:
        log.error("users file unreadable", error=str(exc))
        return dash.error_page(
            request, 503, "Users file unreadable",
            f"{exc}. Fix the file (or recreate it with mercure web user add), then reload.",
        )  # fmt: skip

    async def server_error(request: Request, exc: Exception) -> Response:
        incident = _secrets.token_hex(4)
        log.error(
            "dashboard request failed",
            incident=incident,
            path=request.url.path,
            error=redact(f"{exc.__class__.__name__}: {exc}", dash.secrets),
            exc_info=exc,
        )
        return dash.error_page(
            request, 500, "Something went wrong",
            f"The dashboard could not build this page (incident {incident}; the router's log "
            "has the details). The router itself is not affected. Reload, or try again later.",
        )  # fmt: skip

    routes = [
        Route("/login", views_jobs.login_page, methods=["GET"]),
        Route("/login", views_jobs.login_submit, methods=["POST"]),
        Route("/logout", views_jobs.logout, methods=["POST"]),
        Route("/", views_jobs.overview, methods=["GET"]),
        Route("/plot.svg", views_jobs.plot, methods=["GET"]),
        Route("/queue", views_jobs.queue, methods=["GET"]),
        Route("/jobs/{task_id}", views_jobs.job, methods=["GET"]),
        Route("/find", views_jobs.find, methods=["GET"]),
        Route("/studies", views_studies.studies, methods=["GET"]),
        Route("/rules", views_admin.rules, methods=["GET"]),
        Route("/rules/test", views_admin.rules_test, methods=["POST"]),
        Route("/rules/replay", views_admin.rules_replay, methods=["POST"]),
        Route("/targets", views_admin.targets, methods=["GET"]),
        Route("/targets/{name}/test", views_admin.target_test, methods=["POST"]),
        Route("/configuration", views_admin.configuration, methods=["GET"]),
        Route("/actions/{action}", views_admin.confirm, methods=["GET"]),
        Route("/actions/{action}", views_admin.act, methods=["POST"]),
        Route("/healthz", views_jobs.healthz, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            LoginRequired: login_required,
            Refused: refused,
            UsersFileError: users_file_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    app.state.dashboard = dash
    return Guard(app, dash)


class Guard:
    """Outermost ASGI layer: security headers on every response, and no configuration secret
    in any text body (the values are replaced by the mask)."""

    def __init__(self, app: ASGIApp, dash: Dashboard) -> None:
        self.app = app
        self.dashboard = dash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        textual = False

        async def capture(message: Message) -> None:
            nonlocal start, textual
            if message["type"] == "http.response.start":
                start = message
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                textual = ctype.startswith((b"text/", b"application/json", b"image/svg"))
                if not textual:
                    await send(_with_headers(message))
                return
            if message["type"] == "http.response.body" and textual:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = redact(b"".join(chunks).decode("utf-8", "replace"), self.dashboard.secrets)
                data = body.encode("utf-8")
                assert start is not None
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                headers.append((b"content-length", str(len(data)).encode()))
                await send(_with_headers({**start, "headers": headers}))
                await send({"type": "http.response.body", "body": data})
                return
            await send(message)

        await self.app(scope, receive, capture)


def _with_headers(message: Message) -> Message:
    headers = list(message.get("headers", []))
    present = {k.lower() for k, _ in headers}
    for name, value in SECURITY_HEADERS.items():
        if name.lower().encode() not in present:
            headers.append((name.lower().encode(), value.encode()))
    return {**message, "headers": headers}


def dashboard_of(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


__all__ = ["Dashboard", "Guard", "LoginRequired", "Refused", "create_app", "dashboard_of"]
