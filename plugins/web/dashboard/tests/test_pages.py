"""The pages and the operator actions over HTTP, against a running router, once with the
ledger on SQLite and once on PostgreSQL: queue, a job's history, find, overview, studies;
retry, suspend and resume, force a study. Each action is checked where it acts (the spool,
the targets) and in the ledger (with the operator who acted)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest
from dashboard_env import Env, csrf_of, login, wait_until
from mercure.testing import make_series, store_instances
from pydicom.uid import generate_uid


def ledger_events(env: Env, types: list[str]) -> list[dict[str, Any]]:
    from mercure.ledger import open_queries

    q = open_queries(env.config)
    try:
        return q.events(types=types, limit=200)
    finally:
        q.db.close()


def deliveries(env: Env, task_id: str) -> list[dict[str, Any]]:
    from mercure.ledger import open_queries

    q = open_queries(env.config)
    try:
        history = q.job(task_id)
        return history.deliveries if history else []
    finally:
        q.db.close()


def ledger_job(env: Env, description: str, state: str | None = None) -> dict[str, Any] | None:
    for job in env.ledger_jobs():
        if job.get("series_description") == description and state in (None, job["state"]):
            return job
    return None


def count_on(page: str, state: str) -> int:
    match = re.search(rf'id="count-{state}">(\d+)<', page)
    assert match, f"no count of {state} on the page"
    return int(match.group(1))


def act(client: Any, action: str, **fields: str) -> Any:
    """The confirmation page of ``action``, then its form sent back as a browser would."""
    confirm = client.get(f"/actions/{action}", params=fields)
    assert confirm.status_code == 200, confirm.text
    assert 'id="confirm"' in confirm.text
    return client.post(f"/actions/{action}", data={**fields, "csrf": csrf_of(confirm.text)})


def test_queue_history_find_and_overview(env: Env, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", 2, series_description=f"pages {env.backend}",
                        AccessionNumber=f"ACC-P-{env.backend}", PatientID="PID-P-1")  # fmt: skip
    store_instances(files, env.dicom_port)
    job = wait_until(lambda: ledger_job(env, f"pages {env.backend}", "success"), 60,
                     "the delivered job in the ledger")  # fmt: skip
    vera = login(env.url, "vera")

    queue = vera.get("/queue")
    assert queue.status_code == 200 and f"pages {env.backend}" in queue.text
    assert job["task_id"][:8] in queue.text
    in_success = vera.get("/queue", params={"state": "success"}).text
    assert job["task_id"][:8] in in_success
    assert job["task_id"][:8] not in vera.get("/queue", params={"state": "error"}).text
    assert job["task_id"][:8] in vera.get("/queue", params={"target": "archive"}).text

    history = html.unescape(vera.get(f"/jobs/{job['task_id']}").text)
    assert "delivered archive: 2 instance(s)" in history
    assert "completed every target confirmed every instance" in history

    found = vera.get("/find", params={"accession": f"ACC-P-{env.backend}"}).text
    assert job["task_id"][:8] in found and "1 job(s)" in found
    assert "0 job(s)" in vera.get("/find", params={"accession": "ACC-NOWHERE"}).text

    overview = vera.get("/").text
    successes = sum(1 for j in env.ledger_jobs() if j["state"] == "success")
    assert count_on(overview, "success") == successes >= 1
    assert "archive" in overview
    plot = vera.get("/plot.svg")
    assert plot.status_code == 200 and plot.text.lstrip().startswith("<svg")


def test_retry_suspend_and_resume(env: Env, tmp_path: Path) -> None:
    files = make_series(tmp_path / "pacs", 2, series_description="for pacs")
    store_instances(files, env.dicom_port)
    failed = wait_until(lambda: ledger_job(env, "for pacs", "error"), 60, "the failed job")
    olga = login(env.url, "olga")
    assert count_on(olga.get("/").text, "error") >= 1
    env.pacs.mkdir(exist_ok=True)
    done = act(olga, "retry", task=failed["task_id"])
    assert done.status_code == 200 and "moved back to outgoing/" in done.text
    wait_until(lambda: ledger_job(env, "for pacs", "success"), 60, "the retried job delivered")
    history = html.unescape(olga.get(f"/jobs/{failed['task_id']}").text)
    assert "manual retry by olga" in history and "delivered pacs: 2 instance(s)" in history
    again = act(olga, "suspend", what="dispatching", reason="PACS upgrade")
    assert "dispatching suspended" in again.text
    assert (env.config.folder("outgoing") / "HALT").exists()
    assert "by olga (PACS upgrade)" in olga.get("/queue").text
    assert "dispatching resumed" in act(olga, "resume", what="dispatching").text
    assert not (env.config.folder("outgoing") / "HALT").exists()
    events = wait_until(
        lambda: (e := ledger_events(env, ["retry", "suspend", "resume"])) and len(e) >= 3 and e,
        30, "the actions in the ledger",
    )  # fmt: skip
    assert {(e["type"], e["extra"].get("operator"), e["extra"].get("by")) for e in events} >= {
        ("retry", "olga", "web"), ("suspend", "olga", "web"), ("resume", "olga", "web")
    }  # fmt: skip


def test_force_a_study_from_the_studies_page(env: Env, tmp_path: Path) -> None:
    study_uid = generate_uid()
    files = make_series(tmp_path / "mr", 3, modality="MR", series_description="Ax T2",
                        study_uid=study_uid)  # fmt: skip
    store_instances(files, env.dicom_port)
    vera, olga = login(env.url, "vera"), login(env.url, "olga")
    page = wait_until(
        lambda: (t := vera.get("/studies").text) and f'data-study="{study_uid}"' in t and t, 60,
        "the study on the studies page",
    )  # fmt: skip
    assert "mr_study" in page and "Ax T2" in page and "timeout" in page
    assert "/actions/force" not in page  # a viewer is offered nothing ...
    token = csrf_of(page)
    refused = vera.post("/actions/force", data={"study": study_uid, "csrf": token})
    assert refused.status_code == 403 and "needs an operator" in refused.text  # ... nor allowed
    forged = olga.post("/actions/force", data={"study": study_uid, "rule": "mr_study"})
    assert forged.status_code == 403 and "security token" in forged.text
    listed = olga.get("/studies").text
    assert study_uid in listed and "/actions/force?study=" in listed  # still waiting
    link = re.search(rf'data-study="{re.escape(study_uid)}".*?href="/jobs/([0-9a-f-]+)"', listed,
                     re.S)  # fmt: skip
    assert link, "the study's job is not linked"
    collecting = olga.get(f"/jobs/{link.group(1)}")
    assert collecting.status_code == 200 and "studies/" in collecting.text
    assert "being collected by rule mr_study" in collecting.text
    done = act(olga, "force", study=study_uid, rule="mr_study")
    assert done.status_code == 200 and "completion requested" in done.text
    released = wait_until(
        lambda: next((e for e in ledger_events(env, ["study_release"])
                      if e["series_uid"] == study_uid), None),
        60, "the study released",
    )  # fmt: skip
    task_id = released["task_id"]
    assert task_id == link.group(1)
    wait_until(lambda: task_id in env.jobs("success"), 60, "the study job delivered")
    delivered = wait_until(lambda: len(deliveries(env, task_id)) == 3 and deliveries(env, task_id),
                           30, "the deliveries in the ledger")  # fmt: skip
    assert {d["target"] for d in delivered} == {"archive"}
    assert {d["sop_instance_uid"] + ".dcm" for d in delivered} == {f.name for f in files}
    assert study_uid not in olga.get("/studies").text
    forced = [e for e in ledger_events(env, ["study_force"]) if e["task_id"] == task_id]
    assert [(e["extra"]["operator"], e["extra"]["by"]) for e in forced] == [("olga", "web")]
    history = html.unescape(olga.get(f"/jobs/{task_id}").text)
    assert "completion forced by olga" in history
    unknown = act(olga, "force", study="1.2.3.no.such.study")
    assert unknown.status_code == 409
    assert "no study '1.2.3.no.such.study'" in html.unescape(unknown.text)


@pytest.mark.parametrize("page", ["/", "/queue", "/studies", "/find?patient_id=x"])
def test_pages_answer_for_both_roles(env: Env, page: str) -> None:
    for user in ("olga", "vera"):
        assert login(env.url, user).get(page).status_code == 200
