"""Access control over HTTP against a running router: login, roles, CSRF, cookies, secrets,
patient data, unknown jobs and error pages."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import httpx
import pytest
from dashboard_env import (
    PASSWORDS,
    SECRETS,
    Env,
    csrf_of,
    login,
    running,
    set_cookie,
    wait_until,
)
from mercure.testing import make_series, store_instances

PAGES = ("/", "/queue", "/queue?state=error", "/find", "/rules", "/targets", "/configuration",
         "/plot.svg")  # fmt: skip


@pytest.fixture(scope="module")
def failed_job(env: Env, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A job in error/: sent to the 'pacs' folder target, whose folder does not exist."""
    files = make_series(tmp_path_factory.mktemp("s"), 2, series_description="for pacs",
                        AccessionNumber="ACC-ERR-1", PatientID="PID-ERR-1")  # fmt: skip
    store_instances(files, env.dicom_port)
    jobs = wait_until(lambda: env.jobs("error"), 60, "the job in error/")
    wait_until(
        lambda: any(j["state"] == "error" for j in env.ledger_jobs()), 30, "the ledger's error"
    )
    return str(jobs[0])


def test_pages_need_a_login(env: Env) -> None:
    with httpx.Client(base_url=env.url) as client:
        for page in PAGES:
            answer = client.get(page)
            assert answer.status_code == 303, page
            assert answer.headers["location"].startswith("/login?next=")
        post = client.post("/actions/retry", data={"task": "x", "csrf": "y"})
        assert post.status_code == 401 and "Login needed" in post.text


def test_login_sets_a_secure_session_cookie_and_refuses_wrong_passwords(env: Env) -> None:
    with httpx.Client(base_url=env.url) as client:
        page = client.get("/login")
        pre, _ = set_cookie(page, "mercure_login")
        wrong = client.post(
            "/login",
            data={"csrf": csrf_of(page.text), "username": "olga", "password": "nope"},
            headers={"Cookie": f"mercure_login={pre}"},
        )
        assert wrong.status_code == 401 and "wrong password" in wrong.text
        assert "mercure_session" not in wrong.headers.get("set-cookie", "")
        # A login form without its token (a login CSRF) is refused.
        forged = client.post("/login", data={"username": "olga", "password": PASSWORDS["olga"]})
        assert forged.status_code == 403 and "security token" in forged.text
        right = client.post(
            "/login",
            data={"csrf": csrf_of(page.text), "username": "olga", "password": PASSWORDS["olga"]},
            headers={"Cookie": f"mercure_login={pre}"},
        )
        assert right.status_code == 303
        _, attributes = set_cookie(right, "mercure_session")
        flags = {a.strip().split("=")[0].lower(): a.strip() for a in attributes.split(";")}
        assert "httponly" in flags and "secure" in flags
        assert flags["samesite"].lower() == "samesite=strict"
        assert right.headers["content-security-policy"].startswith("default-src 'none'")


def test_login_is_throttled_after_repeated_failures(tmp_path: Path) -> None:
    with running(tmp_path) as env, httpx.Client(base_url=env.url) as client:
        codes = []
        for _ in range(6):
            page = client.get("/login")
            pre, _ = set_cookie(page, "mercure_login")
            codes.append(
                client.post(
                    "/login",
                    data={"csrf": csrf_of(page.text), "username": "vera", "password": "bad"},
                    headers={"Cookie": f"mercure_login={pre}"},
                ).status_code
            )
        assert codes == [401] * 5 + [429]


def test_a_viewer_cannot_act_the_server_refuses(env: Env, failed_job: str) -> None:
    vera = login(env.url, "vera")
    page = vera.get(f"/jobs/{failed_job}")
    assert page.status_code == 200
    assert 'id="retry"' not in page.text  # the page offers nothing...
    token = csrf_of(page.text)
    # ... and the server refuses the action whatever the browser sends.
    for action, data in (("retry", {"task": failed_job}), ("discard", {"task": failed_job}),
                         ("suspend", {"what": "dispatching"})):  # fmt: skip
        answer = vera.post(f"/actions/{action}", data={**data, "csrf": token})
        assert answer.status_code == 403, action
        assert "needs an operator" in answer.text
        assert vera.get(f"/actions/{action}", params=data).status_code == 403
    assert failed_job in env.jobs("error")
    assert not (env.config.folder("outgoing") / "HALT").exists()


def test_forged_forms_without_the_token_are_refused(env: Env, failed_job: str) -> None:
    olga = login(env.url, "olga")
    no_token = olga.post("/actions/discard", data={"task": failed_job})
    assert no_token.status_code == 403 and "security token" in no_token.text
    wrong = olga.post("/actions/discard", data={"task": failed_job, "csrf": "forged"})
    assert wrong.status_code == 403
    token = csrf_of(olga.get("/").text)
    other_site = olga.post(
        "/actions/discard",
        data={"task": failed_job, "csrf": token},
        headers={"Origin": "https://evil.example.org"},
    )
    assert other_site.status_code == 403 and "another site" in other_site.text
    # Another user's token does not work in this session either.
    vera_token = csrf_of(login(env.url, "vera").get("/").text)
    assert olga.post("/actions/discard", data={"task": failed_job,
                                               "csrf": vera_token}).status_code == 403  # fmt: skip
    assert failed_job in env.jobs("error")


def test_no_page_or_error_shows_a_secret(env: Env, failed_job: str) -> None:
    olga = login(env.url, "olga")
    bodies = {}
    for page in (*PAGES, f"/jobs/{failed_job}", "/jobs/no-such-job", "/nowhere",
                 "/actions/retry?task=no-such-job", "/actions/suspend?what=nothing"):  # fmt: skip
        answer = olga.get(page)
        assert answer.status_code in (200, 400, 404), (page, answer.status_code)
        bodies[page] = answer.text
    token = csrf_of(bodies["/"])
    for path, data in (("/targets/pacs/test", {}), ("/targets/archive/test", {}),
                       ("/actions/retry", {"task": "no-such-job"}),
                       ("/rules/test", {"tags": '{"Modality": "CT"}'}),
                       ("/rules/replay", {"config": "{not json"})):  # fmt: skip
        answer = olga.post(path, data={**data, "csrf": token})
        bodies[path] = answer.text
    for page, body in bodies.items():
        for secret in SECRETS:
            assert secret not in body, f"{page} shows a secret"
        assert "Traceback" not in body
    config_page = html.unescape(bodies["/configuration"])
    assert '"api_token": "••••••"' in config_page and '"password": "••••••"' in config_page
    assert "hooks.example.org" in config_page  # the webhook's host stays visible
    assert "archive: OK" in bodies["/targets/archive/test"]
    assert "pacs: FAILED" in bodies["/targets/pacs/test"]


def test_unknown_jobs_and_bad_requests_get_clear_pages(env: Env) -> None:
    vera = login(env.url, "vera")
    unknown = vera.get("/jobs/0000-does-not-exist")
    assert unknown.status_code == 404
    assert "No job 0000-does-not-exist" in unknown.text and "Find" in unknown.text
    assert vera.get("/queue?state=nonsense").status_code == 400
    missing = vera.get("/no/such/page")
    assert missing.status_code == 404 and "There is no page at this address" in missing.text
    assert vera.get("/find?since=yesterday-ish").status_code == 400


def test_a_failing_page_says_so_without_a_trace(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from mercure_web_dashboard.queries import DashboardQueries

    def broken(self: object) -> dict[str, int]:
        raise RuntimeError(f"database exploded with {SECRETS[0]}")

    monkeypatch.setattr(DashboardQueries, "state_counts", broken)
    answer = login(env.url, "vera").get("/queue")
    assert answer.status_code == 500
    assert "Something went wrong" in answer.text and "incident" in answer.text
    assert "Traceback" not in answer.text and "exploded" not in answer.text


def test_patient_data_only_for_allowed_roles(tmp_path: Path, ledger: str) -> None:
    with running(tmp_path, ledger, patient_data_roles=["operator"]) as env:
        files = make_series(tmp_path / "s", 2, PatientID="PID-SECRET-7",
                            PatientName="Doe^Jane", AccessionNumber="ACC-7")  # fmt: skip
        store_instances(files, env.dicom_port)
        wait_until(lambda: any(j["state"] == "success" for j in env.ledger_jobs()), 60,
                   "the job delivered and in the ledger")  # fmt: skip
        job = next(j for j in env.ledger_jobs() if j["state"] == "success")
        vera, olga = login(env.url, "vera"), login(env.url, "olga")
        for page in ("/queue", f"/jobs/{job['task_id']}", "/find?series_uid=" + job["series_uid"]):
            seen = vera.get(page).text
            assert "PID-SECRET-7" not in seen and "Doe^Jane" not in seen and "ACC-7" not in seen
            assert "••••••" in seen
            assert "PID-SECRET-7" in olga.get(page).text
        refused = vera.get("/find", params={"accession": "ACC-7"})
        assert refused.status_code == 403 and "may not search by Accession" in refused.text
        found = olga.get("/find", params={"accession": "ACC-7"})
        assert job["task_id"][:8] in found.text


def test_users_file_is_private_and_removal_ends_sessions(env: Env) -> None:
    from mercure_web_dashboard.users import UsersFile

    path = Path(json.loads(json.dumps(str(env.root / "users.json"))))
    assert path.stat().st_mode & 0o077 == 0
    users = UsersFile(path)
    users.set_password("temp", "temporary-password-1", "viewer")
    temp = login(env.url, "temp", "temporary-password-1")
    assert temp.get("/").status_code == 200
    users.remove("temp")
    assert temp.get("/").status_code == 303  # logged out at the next request
    shutil.copy(path, env.root / "users.bak")
