"""Pages that look: login, overview (with its plot), queue, one job's history, find."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mercure.cli.history import history_lines, parse_time
from mercure.controls import CONTROLLED, suspended_by
from mercure.jobs.incoming import instance_files
from mercure.ledger import LedgerConfigError, LedgerUnavailable
from mercure.ledger.query import JobHistory
from mercure.processing.record import read_record
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from mercure_web_dashboard.app import LoginRequired, Refused, dashboard_of
from mercure_web_dashboard.masking import mask_phi
from mercure_web_dashboard.plot import throughput_svg
from mercure_web_dashboard.queries import JOB_STATES
from mercure_web_dashboard.security import LOGIN_COOKIE, SESSION_COOKIE

LEDGER_ERRORS = (LedgerUnavailable, LedgerConfigError)


def _safe_next(value: str | None) -> str:
    """Only a path on this server (no scheme, no host, no //) to go back to after login."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return "/" if parts.scheme or parts.netloc else value


# -- login -------------------------------------------------------------------------------------


async def login_page(request: Request, error: str = "", status: int = 200) -> Response:
    dash = dashboard_of(request)
    if dash.session_of(request) is not None and not error:
        return RedirectResponse(_safe_next(request.query_params.get("next")), status_code=303)
    cookie = request.cookies.get(LOGIN_COOKIE) or dash.login_tokens.new_cookie()
    response = dash.render(
        request,
        "login.html",
        {
            "login_token": dash.login_tokens.token(cookie),
            "next": _safe_next(request.query_params.get("next")),
            "error": error,
            "proxy": bool(dash.settings.trusted_header),
        },
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE, cookie, httponly=True, secure=dash.settings.secure_cookies,
        samesite="strict", path="/login",
    )  # fmt: skip
    return response


async def login_submit(request: Request) -> Response:
    dash = dashboard_of(request)
    form = await dash.form(request, None)
    name = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    address = request.client.host if request.client else "?"
    if dash.guard.blocked(name, address):
        return await login_page(
            request, "Too many failed logins: wait 15 minutes, then try again.", 429
        )
    user = await run_in_threadpool(dash.users.authenticate, name, password)
    if user is None:
        dash.guard.failed(name, address)
        return await login_page(request, "Unknown user name or wrong password.", 401)
    dash.guard.succeeded(name)
    session = dash.sessions.create(user.name, user.role)
    response = RedirectResponse(_safe_next(str(form.get("next") or "/")), status_code=303)
    dash.set_session_cookie(response, session)
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


async def logout(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.session_of(request)
    if session is None:
        raise LoginRequired()
    await dash.form(request, session)
    dash.sessions.end(session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def healthz(request: Request) -> Response:
    """For a load balancer: answers without a login and says nothing about the router."""
    return PlainTextResponse("ok")


# -- overview ----------------------------------------------------------------------------------


def _disk(config: Any) -> list[dict[str, Any]]:
    """Disk use of each file system the spool folders are on."""
    seen: dict[int, dict[str, Any]] = {}
    for name in ("incoming", "outgoing", "processing", "success", "error", "discard"):
        folder = Path(config.folder(name))
        probe = folder if folder.exists() else folder.parent
        try:
            usage = shutil.disk_usage(probe)
            dev = probe.stat().st_dev
        except OSError:
            continue
        entry = seen.setdefault(
            dev,
            {"folders": [], "total": usage.total, "used": usage.used, "free": usage.free},
        )
        entry["folders"].append(name)
    for entry in seen.values():
        entry["percent"] = round(100.0 * entry["used"] / max(entry["total"], 1), 1)
    return list(seen.values())


def _controls(config: Any) -> list[dict[str, Any]]:
    return [{"what": w, "suspended": suspended_by(config, w)} for w in CONTROLLED]


def _overview(dash: Any) -> dict[str, Any]:
    config = dash.config
    data: dict[str, Any] = {"disk": _disk(config), "controls": _controls(config)}
    try:
        with dash.ledger.open() as q:
            data["counts"] = q.state_counts()
            data["services"] = q.services()
            data["targets"] = q.target_summary(list(config.targets))
    except LEDGER_ERRORS as exc:
        data["ledger_error"] = str(exc)
    return data


async def overview(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request)
    data = await run_in_threadpool(_overview, dash)
    return dash.render(request, "overview.html", {"hours": dash.settings.plot_hours, **data})


async def plot(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request)
    hours = dash.settings.plot_hours
    now = time.time()

    def build() -> str:
        with dash.ledger.open() as q:
            series = q.throughput(now - hours * 3600)
        return throughput_svg(series, now - hours * 3600, now)

    try:
        svg = await run_in_threadpool(build)
    except LEDGER_ERRORS:
        svg = throughput_svg({"received": {}, "delivered": {}}, now - hours * 3600, now)
    return Response(svg, media_type="image/svg+xml")


# -- queue -------------------------------------------------------------------------------------


async def queue(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request)
    p = request.query_params
    state = p.get("state") or ""
    if state and state not in JOB_STATES:
        raise Refused(f"unknown state '{state}'; choose one of {', '.join(JOB_STATES)}", 400)
    target = (p.get("target") or "").strip()
    task = (p.get("task") or "").strip()
    cursor = p.get("after") or None

    def load() -> dict[str, Any]:
        with dash.ledger.open() as q:
            page = q.jobs_page(
                state=state or None,
                target=target or None,
                task_prefix=task or None,
                cursor=cursor,
                limit=dash.settings.page_size,
            )
            return {"counts": q.state_counts(), "page": page}

    try:
        data = await run_in_threadpool(load)
    except LEDGER_ERRORS as exc:
        data = {"ledger_error": str(exc), "counts": {}, "page": None}
    return dash.render(
        request,
        "queue.html",
        {"state": state, "target": target, "task": task, "states": JOB_STATES,
         "controls": _controls(dash.config), **data},
    )  # fmt: skip


# -- one job -----------------------------------------------------------------------------------


def _spool_view(dash: Any, task_id: str) -> dict[str, Any] | None:
    """Where the job is on the spool now (the ledger records history; the spool says what can
    be done with it): state, current task file, instances, processing record."""
    ref = dash.runtime.store.find(task_id)
    if ref is None or ref.id != task_id:
        return _collecting_view(dash, task_id)
    view: dict[str, Any] = {"state": ref.state}
    try:
        view["task"] = json.loads((ref.path / "task.json").read_text())
    except (OSError, ValueError) as exc:
        view["task_error"] = f"task.json cannot be read: {exc}"
    try:
        view["instances"] = len(instance_files(ref.path))
        record = read_record(ref.path)
        if record is not None:
            view["processing"] = record.describe()
    except (OSError, ValueError) as exc:
        view["processing"] = f"processing record unreadable: {exc}"
    return view


def _collecting_view(dash: Any, task_id: str) -> dict[str, Any] | None:
    """A study job still being collected in ``studies/`` (not yet in a state folder)."""
    from mercure.operations import study_store

    for study in study_store(dash.runtime).open_studies():
        if study.task_id == task_id:
            return {"state": "studies", "instances": study.instances, "study": study}
    return None


def _masked_history(history: JobHistory, phi: bool) -> JobHistory:
    if phi:
        return history
    job = dict(history.job)
    job["tags"] = mask_phi(job.get("tags") or {}, False)
    job["task"] = mask_phi(job.get("task") or {}, False)
    for key in ("patient_id", "accession"):
        if job.get(key):
            job[key] = mask_phi({"patient_id": job[key]}, False)["patient_id"]
    return JobHistory(
        job=job,
        events=history.events,
        attempts=history.attempts,
        deliveries=history.deliveries,
        processing=[{**r, "log": None, "result": None} for r in history.processing],
        notifications=history.notifications,
        related=history.related,
        series=mask_phi(history.series, False) if history.series else None,
    )


async def job(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.require(request)
    task_id = request.path_params["task_id"]
    phi = dash.can_see_phi(session)

    def load() -> dict[str, Any]:
        data: dict[str, Any] = {"spool": None, "history": None}
        try:
            with dash.ledger.open() as q:
                ids = q.resolve(task_id)
                if len(ids) == 1:
                    data["history"] = q.job(ids[0])
                    data["resolved"] = ids[0]
                elif len(ids) > 1:
                    data["ambiguous"] = ids
        except LEDGER_ERRORS as exc:
            data["ledger_error"] = str(exc)
        data["spool"] = _spool_view(dash, data.get("resolved", task_id))
        return data

    data = await run_in_threadpool(load)
    history: JobHistory | None = data["history"]
    if history is None and data["spool"] is None and not data.get("ambiguous"):
        why = data.get("ledger_error") or "the ledger has no record of it"
        return dash.render(
            request,
            "unknown_job.html",
            {"task_id": task_id, "why": why},
            status=404,
        )
    if history is not None:
        history = _masked_history(history, phi)
        data["lines"] = history_lines(history)
    if data["spool"] and not phi:
        data["spool"]["task"] = mask_phi(data["spool"].get("task"), False)
    return dash.render(
        request,
        "job.html",
        {"task_id": data.get("resolved", task_id), "h": history, **data},
    )


# -- find --------------------------------------------------------------------------------------

FIND_FIELDS = (
    ("patient_id", "Patient ID", True),
    ("accession", "Accession number", True),
    ("study_uid", "Study Instance UID", False),
    ("series_uid", "Series Instance UID", False),
    ("sop_instance_uid", "SOP Instance UID", False),
    ("task_id", "Job id (prefix)", False),
)


async def find(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.require(request)
    phi = dash.can_see_phi(session)
    p = request.query_params
    criteria = {key: (p.get(key) or "").strip() for key, _, _ in FIND_FIELDS}
    since_text = (p.get("since") or "").strip()
    wanted = {k: v for k, v in criteria.items() if v}
    context: dict[str, Any] = {"fields": FIND_FIELDS, "criteria": criteria, "since": since_text}
    if not wanted and not since_text:
        return dash.render(request, "find.html", {**context, "rows": None})
    blocked = [label for key, label, is_phi in FIND_FIELDS if is_phi and key in wanted and not phi]
    if blocked:
        raise Refused(
            f"your role ({session.role}) may not search by {', '.join(blocked)}; "
            "search by a UID or a job id instead"
        )
    try:
        since = parse_time(since_text) if since_text else None
    except ValueError as exc:
        return dash.render(request, "find.html", {**context, "rows": None, "error": str(exc)}, 400)

    def load() -> list[dict[str, Any]]:
        with dash.ledger.open() as q:
            return q.find(since=since, limit=200, **wanted)

    try:
        rows = await run_in_threadpool(load)
    except LEDGER_ERRORS as exc:
        return dash.render(
            request, "find.html", {**context, "rows": None, "error": f"the ledger: {exc}"}, 503
        )
    return dash.render(request, "find.html", {**context, "rows": rows})


__all__ = ["find", "healthz", "job", "login_page", "login_submit", "logout", "overview", "queue"]
