"""Pages about the configuration (rules with tester and replay, targets with their check, the
masked configuration) and the operator actions, each behind a confirmation page.

The actions call :mod:`mercure.operations`, the functions behind ``mercure job retry``,
``mercure job discard``, ``mercure study complete``, ``mercure suspend`` and
``mercure resume``, with the logged-in user as the operator, so the ledger records who did
what and from where (``by: web``).
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from mercure.cli.history import parse_time
from mercure.config import ConfigError, validate_config
from mercure.controls import CONTROLLED
from mercure.ledger.replay import replay
from mercure.operations import (
    OperationError,
    discard_job,
    force_complete_study,
    resume_service,
    retry_job,
    suspend_service,
)
from mercure.rules import RuleError, compile_rule
from mercure.services.router import evaluate_rules
from mercure.tags import read_tags
from mercure.targets import TargetError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from mercure_web_dashboard.app import Refused, dashboard_of
from mercure_web_dashboard.masking import SecretMasker, mask_tags, masked_config
from mercure_web_dashboard.views_jobs import LEDGER_ERRORS

MAX_TAGS_TEXT = 200_000

# -- rules -------------------------------------------------------------------------------------


def _rule_rows(config: Any) -> list[dict[str, Any]]:
    masker = SecretMasker()
    rows = []
    for name, rule in config.rules.items():
        state = "disabled" if rule.disabled else "fallback" if rule.fallback else "active"
        target = rule.target if isinstance(rule.target, str) else ", ".join(rule.target or [])
        rows.append(
            {
                "name": name,
                "rule": rule.rule,
                "action": rule.action,
                "target": target,
                "state": state,
                "settings": masker.model(rule),
            }
        )
    return rows


async def rules(request: Request, extra: dict[str, Any] | None = None, status: int = 200) -> Any:
    dash = dashboard_of(request)
    dash.require(request)
    context = {"rules": _rule_rows(dash.config), "tags_text": "", "rule_text": "",
               "since": "7d", **(extra or {})}  # fmt: skip
    return dash.render(request, "rules.html", context, status=status)


def _parse_tags(text: str) -> dict[str, str]:
    """A JSON object of tag -> value, or lines of ``Keyword: value`` / ``Keyword=value``."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"the tags are not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("the tags JSON must be an object of tag name to value")
        return {str(k): str(v) for k, v in data.items()}
    tags: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = ":" if ":" in line else "=" if "=" in line else None
        if sep is None:
            raise ValueError(f"line {number} is neither 'Keyword: value' nor 'Keyword=value'")
        key, _, value = line.partition(sep)
        tags[key.strip()] = value.strip()
    return tags


async def _upload_bytes(item: Any) -> bytes | None:
    if isinstance(item, UploadFile) and item.filename:
        data = await item.read()
        return data or None
    return None


async def rules_test(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.require(request)
    form = await dash.form(request, session)
    tags_text = str(form.get("tags") or "")[:MAX_TAGS_TEXT]
    rule_text = str(form.get("rule") or "").strip()
    context: dict[str, Any] = {"tags_text": tags_text, "rule_text": rule_text}
    try:
        upload = await _upload_bytes(form.get("file"))
        if upload is not None:
            extra = list(dash.config.dicom_receiver.additional_tags)
            with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
                fh.write(upload)
                fh.flush()
                try:
                    tags = read_tags(fh.name, extra)
                except Exception as exc:
                    raise ValueError(
                        f"the uploaded file is not a readable DICOM file: {exc}"
                    ) from None
        else:
            tags = _parse_tags(tags_text)
        if not tags:
            raise ValueError("give the tags (JSON or 'Keyword: value' lines) or a DICOM file")
    except ValueError as exc:
        return await rules(request, {**context, "test_error": str(exc)}, 400)
    phi = dash.can_see_phi(session)
    context["tested_tags"] = mask_tags(tags, phi)
    if rule_text:
        try:
            result = compile_rule(rule_text).evaluate(tags)
        except RuleError as exc:
            return await rules(request, {**context, "test_error": f"{exc}\n{exc.caret()}"}, 400)
        context["single"] = {"matched": result.matched, "explain": result.explain()}
        return await rules(request, context)
    decision = evaluate_rules(dash.config, tags)
    results = []
    for name, rule in dash.config.rules.items():
        result = decision.results.get(name) or compile_rule(rule.rule).evaluate(tags)
        results.append({"name": name, "matched": result.matched, "explain": result.explain()})
    if decision.discard_rule:
        verdict = f"discarded by rule '{decision.discard_rule}'"
    elif decision.triggered:
        how = " (fallback)" if decision.fallback_used else ""
        verdict = f"triggered{how}: {', '.join(decision.triggered)}"
    else:
        verdict = "no rule matches: the series goes to discard/"
    context["results"] = results
    context["verdict"] = verdict
    return await rules(request, context)


async def rules_replay(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.require(request)
    form = await dash.form(request, session)
    since_text = str(form.get("since") or "7d").strip()
    text = str(form.get("config") or "")
    context: dict[str, Any] = {"since": since_text, "replay_text": text}
    try:
        upload = await _upload_bytes(form.get("config_file"))
        raw = upload.decode("utf-8") if upload is not None else text
        if not raw.strip():
            raise ValueError("paste the changed mercure.json or upload it")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"the changed configuration is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("the changed configuration must be a JSON object (mercure.json)")
        start = parse_time(since_text)
        new, _ = validate_config(data, dash.runtime.plugins.registry, "(uploaded configuration)")
    except ConfigError as exc:
        return await rules(request, {**context, "replay_error": str(exc)}, 400)
    except (ValueError, UnicodeDecodeError) as exc:
        return await rules(request, {**context, "replay_error": str(exc)}, 400)

    def run() -> Any:
        with dash.ledger.open() as q:
            return replay(q, new, start)

    try:
        report = await run_in_threadpool(run)
    except LEDGER_ERRORS as exc:
        return await rules(request, {**context, "replay_error": f"the ledger: {exc}"}, 503)
    phi = dash.can_see_phi(session)
    changed = [
        {"series_uid": c.series_uid, "received": c.received, "tags": mask_tags(c.tags, phi),
         "old": c.old, "new": c.new, "changes": c.changes}
        for c in report.changed
    ]  # fmt: skip
    context["replay"] = {"routings": report.routings, "changed": changed, "start": start}
    return await rules(request, context)


# -- targets -----------------------------------------------------------------------------------


async def targets(request: Request, extra: dict[str, Any] | None = None) -> Any:
    dash = dashboard_of(request)
    dash.require(request)
    masker = SecretMasker()
    rows = [
        {"name": name, "type": t.target_type, "comment": t.comment, "settings": masker.model(t)}
        for name, t in dash.config.targets.items()
    ]

    def load() -> dict[str, Any]:
        with dash.ledger.open() as q:
            return q.target_summary(list(dash.config.targets))

    try:
        summary = await run_in_threadpool(load)
        ledger_error = ""
    except LEDGER_ERRORS as exc:
        summary, ledger_error = {}, str(exc)
    return dash.render(
        request,
        "targets.html",
        {"targets": rows, "summary": summary, "ledger_error": ledger_error, **(extra or {})},
    )


async def target_test(request: Request) -> Response:
    """The check of ``mercure targets test NAME`` (C-ECHO, login, ...), on a button."""
    dash = dashboard_of(request)
    session = dash.require(request)
    await dash.form(request, session)
    name = request.path_params["name"]
    if name not in dash.config.targets:
        raise Refused(f"no target named '{name}'", 404)

    def check() -> tuple[bool, str]:
        try:
            return True, str(dash.runtime.target(name).test_connection())
        except TargetError as exc:
            return False, str(exc)
        except Exception as exc:
            return False, f"{exc.__class__.__name__}: {exc}"

    ok, detail = await run_in_threadpool(check)
    return await targets(request, {"tested": {"name": name, "ok": ok, "detail": detail}})


# -- configuration -----------------------------------------------------------------------------


async def configuration(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request)
    data, _ = masked_config(dash.config)
    plugins = sorted(
        (info.name, info.distribution, info.version, info.source)
        for info in dash.runtime.plugins.infos.values()
    )
    return dash.render(
        request,
        "config.html",
        {
            "config_json": json.dumps(data, indent=2, ensure_ascii=False),
            "source": dash.source,
            "plugins": plugins,
        },
    )


# -- operator actions --------------------------------------------------------------------------

ACTIONS = {
    "retry": "Retry job",
    "discard": "Discard job",
    "suspend": "Suspend",
    "resume": "Resume",
    "force": "Force complete study",
}


def _action_subject(action: str, params: Any) -> dict[str, str]:
    if action not in ACTIONS:
        raise Refused(f"unknown action '{action}'", 404)
    if action in ("retry", "discard"):
        task = str(params.get("task") or "").strip()
        if not task:
            raise Refused("say which job: the form lacks the job id", 400)
        return {"task": task}
    if action == "force":
        study = str(params.get("study") or "").strip()
        if not study:
            raise Refused("say which study: the form lacks the Study Instance UID", 400)
        return {"study": study, "rule": str(params.get("rule") or "").strip()}
    what = str(params.get("what") or "").strip()
    if what not in CONTROLLED:
        raise Refused(f"cannot {action} '{what}'; choose {' or '.join(CONTROLLED)}", 400)
    return {"what": what}


async def confirm(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request, "operator")
    action = request.path_params["action"]
    subject = _action_subject(action, request.query_params)
    return dash.render(
        request, "confirm.html", {"action": action, "title": ACTIONS[action], **subject}
    )


async def act(request: Request) -> Response:
    dash = dashboard_of(request)
    session = dash.require(request, "operator")
    form = await dash.form(request, session)
    action = request.path_params["action"]
    subject = _action_subject(action, form)
    reason = str(form.get("reason") or "").strip()[:500]
    runtime = dash.runtime
    user = session.user

    def run() -> str:
        if action == "force":
            outcomes = force_complete_study(
                runtime, subject["study"], rule=subject["rule"] or None, operator=user, by="web"
            )
            return " ".join(o.message for o in outcomes)
        if action == "retry":
            return retry_job(runtime, subject["task"], operator=user, by="web").message
        if action == "discard":
            return discard_job(
                runtime, subject["task"], operator=user, reason=reason, by="web"
            ).message
        if action == "suspend":
            return suspend_service(
                runtime, subject["what"], operator=user, reason=reason, by="web"
            ).message
        return resume_service(runtime, subject["what"], operator=user, by="web").message

    try:
        message = await run_in_threadpool(run)
        failed = False
    except OperationError as exc:
        message, failed = str(exc), True
    back = (
        f"/jobs/{subject['task']}"
        if "task" in subject
        else "/studies"
        if "study" in subject
        else "/queue"
    )
    return dash.render(
        request,
        "done.html",
        {"title": ACTIONS[action], "message": message, "failed": failed, "back": back},
        status=409 if failed else 200,
    )


__all__ = [
    "act",
    "configuration",
    "confirm",
    "rules",
    "rules_replay",
    "rules_test",
    "target_test",
    "targets",
]
