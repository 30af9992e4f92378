"""The studies page: studies being collected by study rules, waiting for their trigger.

Read from the spool's ``studies/`` folder (the ledger knows a study job only once it is
released), with what each waits for: the trigger condition, the time since its last series and
the force-complete deadline of its rule. An operator can force one to complete now, the same
call as ``mercure study complete`` (:func:`mercure.operations.force_complete_study`).
"""

from __future__ import annotations

import time
from typing import Any

from mercure.jobs.studies import OpenStudy
from mercure.operations import study_store
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mercure_web_dashboard.app import dashboard_of


def study_row(config: Any, study: OpenStudy, now: float) -> dict[str, Any]:
    """One study as the page shows it: what it waits for and until when."""
    if study.error:
        return {"folder": study.ref.name, "error": study.error}
    if study.trigger == "received_series" and study.required.strip():
        condition = f"the series {study.required.strip()} (received_series)"
        due = None
    else:
        quiet = config.study_complete_trigger
        condition = f"no new series for {quiet} s (timeout)"
        due = study.last_receive_at + quiet
    deadline = study.created_at + config.study_forcecomplete_trigger
    return {
        "folder": study.ref.name,
        "task_id": study.task_id,
        "study_uid": study.study_uid,
        "rule": study.rule,
        "series": list(study.series),
        "instances": study.instances,
        "quiet": now - study.last_receive_at,
        "waiting": now - study.created_at,
        "condition": condition,
        "due": due,
        "deadline": deadline,
        "deadline_action": study.force_action,
        "force_requested": study.force_requested,
    }


async def studies(request: Request) -> Response:
    dash = dashboard_of(request)
    dash.require(request)
    config = dash.config

    def load() -> list[dict[str, Any]]:
        now = time.time()
        found = study_store(dash.runtime).open_studies()
        rows = [study_row(config, s, now) for s in found]
        return sorted(rows, key=lambda r: -r.get("quiet", 0.0))

    rows = await run_in_threadpool(load)
    rules = [name for name, rule in config.rules.items() if rule.action_trigger == "study"]
    return dash.render(request, "studies.html", {"studies": rows, "study_rules": rules})


__all__ = ["studies", "study_row"]
