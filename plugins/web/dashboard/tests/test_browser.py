"""End to end in headless Chromium (Debian's ``chromium``, driven by Playwright) against a
running router that receives real DICOM from DCMTK's ``storescu``.

An operator logs in, sees a routed series on the queue page and its delivery in its history,
finds it by accession number, retries a job that failed while its target was down and sees it
delivered, suspends dispatching and sees a new series wait, resumes it; a viewer sees no
action. Every page is saved as a screenshot into the folder the test output names
(``MERCURE_SCREENSHOTS`` to choose it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_env import (
    PASSWORDS,
    SCREENSHOTS,
    SECRETS,
    TOKEN,
    TOKEN_ENV,
    Env,
    running,
    wait_until,
)
from mercure.testing import DCMTK_BIN, dcmtk_storescu, make_series

CHROMIUM = Path(os.environ.get("MERCURE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.peer, pytest.mark.slow]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    chosen = os.environ.get("MERCURE_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("dashboard-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    pytestconfig.stash.setdefault(SCREENSHOTS, []).append(str(folder))
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium chromium-driver)")
    if not (DCMTK_BIN / "storescu").exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    try:
        with running(tmp_path_factory.mktemp("live")) as env:
            yield env
    finally:
        mp.undo()


class Pages:
    """One browser tab on the dashboard; each visit is saved as a numbered screenshot."""

    def __init__(self, page: Any, env: Env, folder: Path) -> None:
        self.page = page
        self.env = env
        self.folder = folder
        self.count = len(list(folder.glob("*.png")))  # numbered on from the tests before

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        text = self.page.content()
        for secret in SECRETS:
            assert secret not in text, f"page {name} shows a secret"
        return path

    def go(self, path: str, name: str) -> Any:
        response = self.page.goto(self.env.url + path)
        assert response is not None and response.status < 500, (path, response)
        self.shot(name)
        return response

    def text(self, selector: str = "main") -> str:
        return str(self.page.inner_text(selector))

    def reload_until(self, path: str, needle: str, timeout: float, what: str) -> None:
        def seen() -> bool:
            self.page.goto(self.env.url + path)
            return needle in self.text()

        wait_until(seen, timeout, what)


def send(env: Env, folder: Path, count: int, **tags: Any) -> list[Path]:
    files = make_series(folder, count, **tags)
    dcmtk_storescu(files, env.dicom_port, aec="MERCURE")
    return files


def ledger_job(env: Env, description: str, state: str | None = None) -> dict[str, Any] | None:
    for job in env.ledger_jobs():
        if job.get("series_description") == description and (state is None or
                                                             job["state"] == state):  # fmt: skip
            return job
    return None


def test_operator_and_viewer_in_a_real_browser(
    browser: Any, live: Env, shots: Path, tmp_path: Path
) -> None:
    env = live
    tab = Pages(browser.new_page(), env, shots)

    # Log in: every page asks for it first.
    tab.page.goto(env.url + "/queue")
    assert "/login" in tab.page.url
    tab.shot("login")
    tab.page.fill("input[name=username]", "olga")
    tab.page.fill("input[name=password]", PASSWORDS["olga"])
    tab.page.click("button[type=submit]")
    tab.page.wait_for_url(re.compile(r".*/queue$"))
    cookie = next(c for c in browser.cookies() if c["name"] == "mercure_session")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # A CT series from storescu is routed to the archive: on the queue page, delivered.
    send(env, tmp_path / "ct", 3, series_description="e2e archive", AccessionNumber="ACC-E2E-1",
         PatientID="PID-E2E-1")  # fmt: skip
    job = wait_until(lambda: ledger_job(env, "e2e archive", "success"), 60, "the delivered job")
    tab.reload_until("/queue", "e2e archive", 30, "the series on the queue page")
    row = tab.page.locator("tr", has_text="e2e archive")
    assert "success" in row.inner_text() and "archive" in row.inner_text()
    tab.shot("queue")
    row.locator("a").first.click()
    tab.page.wait_for_url(re.compile(rf".*/jobs/{job['task_id']}$"))
    history = tab.text("#history")
    assert "delivered archive: 3 instance(s)" in history
    assert "completed every target confirmed every instance" in history
    tab.shot("job-delivered")

    # Find it by accession number.
    tab.go("/find", "find-form")
    tab.page.fill("input[name=accession]", "ACC-E2E-1")
    tab.page.click("form.filters button[type=submit]")
    tab.page.wait_for_url(re.compile(r".*/find\?.*accession=ACC-E2E-1.*"))
    assert job["task_id"][:8] in tab.text() and "1 job(s)" in tab.text()
    tab.shot("find-result")

    # A series for the PACS, which is down (its folder is missing): the job ends in error/.
    send(env, tmp_path / "pacs", 2, series_description="for pacs", AccessionNumber="ACC-E2E-2")
    failed = wait_until(lambda: ledger_job(env, "for pacs", "error"), 60, "the failed job")
    tab.go(f"/jobs/{failed['task_id']}", "job-error")
    assert "error/" in tab.text("#spool-state")
    assert tab.page.locator("#job-error").count() == 1
    env.pacs.mkdir()  # the PACS is back
    tab.page.click("#retry")
    tab.page.wait_for_url(re.compile(r".*/actions/retry\?task=.*"))
    tab.shot("retry-confirm")
    tab.page.click("#confirm")
    assert "moved back to outgoing/" in tab.text("#outcome")
    tab.shot("retry-done")
    wait_until(lambda: ledger_job(env, "for pacs", "success"), 60, "the retried job delivered")
    assert len(list(env.pacs.rglob("*.dcm"))) == 2
    tab.go(f"/jobs/{failed['task_id']}", "job-retried")
    history = tab.text("#history")
    assert "manual retry by olga" in history and "delivered pacs: 2 instance(s)" in history

    # Suspend dispatching: a new series waits in outgoing/ ...
    tab.go("/", "overview-before-suspend")
    tab.page.click("a[href='/actions/suspend?what=dispatching']")
    tab.page.fill("input[name=reason]", "PACS maintenance")
    tab.shot("suspend-confirm")
    tab.page.click("#confirm")
    assert "dispatching suspended" in tab.text("#outcome")
    send(env, tmp_path / "held", 2, series_description="e2e held")
    waiting = wait_until(lambda: ledger_job(env, "e2e held", "outgoing"), 60, "the held job")
    wait_until(lambda: waiting["task_id"] in env.jobs("outgoing"), 30, "the job in outgoing/")
    tab.go("/queue?state=outgoing", "queue-suspended")
    assert "SUSPENDED" in tab.text() and "by olga (PACS maintenance)" in tab.text()
    assert "e2e held" in tab.text()
    assert ledger_job(env, "e2e held", "success") is None
    assert waiting["task_id"] in env.jobs("outgoing")
    # ... until dispatching is resumed.
    tab.page.click("a[href='/actions/resume?what=dispatching']")
    tab.page.click("#confirm")
    assert "dispatching resumed" in tab.text("#outcome")
    wait_until(lambda: ledger_job(env, "e2e held", "success"), 60, "the held job delivered")
    tab.reload_until("/", "running", 10, "dispatching running again")
    assert tab.text("#count-success") == "3"
    tab.shot("overview")

    # The other pages.
    tab.go("/rules", "rules")
    tab.page.fill("textarea[name=tags]", "Modality: CT\nSeriesDescription: for pacs")
    tab.page.click("#test-rules")
    assert "triggered: to_pacs" in tab.text("#verdict")
    tab.shot("rules-tested")
    tab.go("/targets", "targets")
    tab.page.locator("#archive button").click()
    assert "archive: OK" in tab.text("#test-result")
    tab.shot("targets-tested")
    tab.go("/configuration", "configuration")
    assert "••••••" in tab.text("#config")
    tab.go("/jobs/does-not-exist", "unknown-job")
    assert "No job does-not-exist" in tab.text()

    # A viewer sees no action, and the ledger recorded who acted.
    tab.page.click("header form.logout button")
    tab.page.wait_for_url(re.compile(r".*/login$"))
    tab.page.fill("input[name=username]", "vera")
    tab.page.fill("input[name=password]", PASSWORDS["vera"])
    tab.page.click("button[type=submit]")
    tab.go(f"/jobs/{failed['task_id']}", "viewer-job")
    assert tab.page.locator("#retry").count() == 0
    tab.go("/", "viewer-overview")
    assert tab.page.locator("a[href^='/actions/']").count() == 0
    events = {(e["type"], (e.get("extra") or {}).get("operator")) for e in _events(env)}
    assert {("retry", "olga"), ("suspend", "olga"), ("resume", "olga")} <= events


def _events(env: Env) -> list[dict[str, Any]]:
    from mercure.ledger import open_queries

    q = open_queries(env.config)
    try:
        return q.events(types=["retry", "suspend", "resume"], limit=100)
    finally:
        q.db.close()


def test_force_a_study_in_a_real_browser(
    browser: Any, live: Env, shots: Path, tmp_path: Path
) -> None:
    """A study rule that waits an hour; the series from storescu waits on the studies page
    until an operator forces the study there; the study job is then routed and delivered."""
    from pydicom.uid import generate_uid

    env = live
    tab = Pages(browser.new_page(), env, shots)
    tab.page.goto(env.url + "/studies")
    if "/login" not in tab.page.url:  # still logged in from the test before
        tab.page.click("header form.logout button")
        tab.page.wait_for_url(re.compile(r".*/login$"))
        tab.page.goto(env.url + "/studies")
    tab.page.fill("input[name=username]", "olga")
    tab.page.fill("input[name=password]", PASSWORDS["olga"])
    tab.page.click("button[type=submit]")
    tab.page.wait_for_url(re.compile(r".*/studies$"))

    study_uid = generate_uid()
    files = send(env, tmp_path / "mr", 3, modality="MR", series_description="e2e Ax T2",
                 study_uid=study_uid)  # fmt: skip
    tab.reload_until("/studies", study_uid, 60, "the study on the studies page")
    row = tab.page.locator(f"tr[data-study='{study_uid}']")
    row.wait_for(timeout=10_000)
    text = row.inner_text()
    assert "mr_study" in text and "e2e Ax T2" in text and "(timeout)" in text
    assert "then discard" in text  # the force-complete deadline and what happens then
    tab.shot("studies")
    assert env.jobs("outgoing") == [] and not _released(env, study_uid)

    row.locator("a.force").click()
    tab.page.wait_for_url(re.compile(r".*/actions/force\?study=.*"))
    assert study_uid in tab.text("h1")
    tab.shot("force-confirm")
    tab.page.click("#confirm")
    assert "completion requested" in tab.text("#outcome")
    tab.shot("force-done")

    released = wait_until(lambda: _released(env, study_uid), 60, "the study released")
    task_id = released["task_id"]
    wait_until(lambda: task_id in env.jobs("success"), 60, "the study job delivered")
    delivered = {p.name for p in env.archive.rglob("*.dcm")}
    assert {f.name for f in files} <= delivered
    tab.reload_until(f"/jobs/{task_id}", "delivered archive: 3 instance(s)", 30,
                     "the study job's delivery in its history")  # fmt: skip
    tab.shot("study-job-delivered")
    history = tab.text("#history")
    assert "completion forced by olga" in history
    assert "delivered archive: 3 instance(s)" in history
    tab.go("/studies", "studies-after")
    assert study_uid not in tab.text()


def _released(env: Env, study_uid: str) -> dict[str, Any] | None:
    from mercure.ledger import open_queries

    q = open_queries(env.config)
    try:
        events = q.events(types=["study_release"], limit=100)
    finally:
        q.db.close()
    return next((e for e in events if e["series_uid"] == study_uid), None)
