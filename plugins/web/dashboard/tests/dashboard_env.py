"""A running router with the dashboard, its users, and helpers to log in and read pages.

The router runs in this process (every service, the ``web`` service among them) on free
loopback ports, receives real DICOM (DCMTK ``storescu`` where the test says so, pynetdicom
otherwise) and writes its ledger to SQLite under the test's folder, or to a new database of
the session's PostgreSQL server (``env`` runs each test module once per backend). Its configuration
carries secrets (a ``${env:...}`` token and a plain password of a test service, a webhook
URL with its token) so that tests can check that no page shows them.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mercure_web_dashboard
import pytest
from mercure import hookimpl
from mercure.config import Config
from mercure.plugin_services import PluginService
from mercure.plugin_settings import PluginSettings
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.secrets import Secret
from mercure.testing import config_for, free_port, start_router, wait_for
from mercure_web_dashboard.users import UsersFile

TOKEN_ENV = "DASHBOARD_TEST_VAULT_TOKEN"
TOKEN = "vault-token-4f1d9c2b7a"
PASSWORD = "plain-Pa55word-8e3a"
WEBHOOK_TOKEN = "SECRETwebhookTOKEN42xyz"
SECRETS = (TOKEN, PASSWORD, WEBHOOK_TOKEN)
SCREENSHOTS = pytest.StashKey[list[str]]()
"""Folders the browser tests saved screenshots in (named at the end of the test output)."""
PASSWORDS = {"olga": "operator-password-1", "vera": "viewer-password-1"}


class VaultSettings(PluginSettings):
    """A test service whose settings hold secrets, to check that they are masked."""

    api_token: Secret = ""
    password: str = ""


class VaultService(PluginService[VaultSettings]):
    pass


class VaultPlugin:
    @hookimpl
    def register_services(self, register: Any) -> None:
        register("vault", VaultSettings, VaultService)


def manager() -> PluginManager:
    pm = build_plugin_manager(autoload=False)
    pm.register(mercure_web_dashboard, "web_dashboard")
    pm.register(VaultPlugin(), "vault_plugin")
    return pm


@dataclass
class Env:
    config: Config
    router: Any
    url: str
    root: Path
    archive: Path
    pacs: Path
    ledger: str = ""

    @property
    def backend(self) -> str:
        return "postgresql" if self.ledger else "sqlite"

    @property
    def dicom_port(self) -> int:
        return int(self.router.port)

    def jobs(self, state: str) -> list[str]:
        folder = self.config.folder(state)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def ledger_jobs(self) -> list[dict[str, Any]]:
        from mercure.ledger import open_queries

        with contextlib.suppress(Exception):
            q = open_queries(self.config)
            try:
                return q.find(since=0, limit=1000)
            finally:
                q.db.close()
        return []


def make_config(root: Path, *, web: dict[str, Any], pm: PluginManager, **extra: Any) -> Config:
    archive, pacs = root / "archive", root / "pacs"
    archive.mkdir(parents=True, exist_ok=True)
    rules: dict[str, Any] = {
        "ct_to_archive": {
            "rule": "tags.Modality == 'CT' and tags.SeriesDescription != 'for pacs'",
            "target": "archive",
            "notification_webhook": f"https://hooks.example.org/services/T01/B02/{WEBHOOK_TOKEN}",
            "notification_trigger_reception": False,
            "notification_trigger_completion": False,
            "notification_trigger_error": False,
        },
        "to_pacs": {"rule": "tags.SeriesDescription == 'for pacs'", "target": "pacs"},
        # A study rule that waits an hour: only forcing releases its studies in a test.
        "mr_study": {"rule": "tags.Modality == 'MR'", "target": "archive",
                     "action_trigger": "study"},
    }  # fmt: skip
    return config_for(
        root,
        targets={
            "archive": {"target_type": "folder", "folder": str(archive)},
            "pacs": {"target_type": "folder", "folder": str(pacs)},
        },
        rules=rules,
        retry_max=1,
        retry_delay=1,
        plugins={
            "services": {
                "web": web,
                "vault": {"api_token": f"${{env:{TOKEN_ENV}}}", "password": PASSWORD},
            }
        },
        study_complete_trigger=3600,
        study_forcecomplete_trigger=7200,
        _registry=pm.registry,
        **extra,
    )


@contextlib.contextmanager
def running(root: Path, ledger: str = "", **web: Any) -> Iterator[Env]:
    """A router with the dashboard on a free port; users olga (operator), vera (viewer).
    ``ledger``: the ledger_database (empty: SQLite in the spool)."""
    pm = manager()
    users_file = root / "users.json"
    users = UsersFile(users_file)
    users.set_password("olga", PASSWORDS["olga"], "operator")
    users.set_password("vera", PASSWORDS["vera"], "viewer")
    port = free_port()
    settings = {"port": port, "users_file": str(users_file), **web}
    config = make_config(root, web=settings, pm=pm, ledger_database=ledger)
    gen = start_router(config, pm)
    router = next(gen)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url), 20, what="the dashboard answering")
        yield Env(config, router, url, root, root / "archive", root / "pacs", ledger)
    finally:
        gen.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


BACKENDS = ("sqlite", "postgresql")


def ledger_database(request: pytest.FixtureRequest, backend: str) -> str:
    """``ledger_database`` for ``backend``: SQLite in the spool, or a new PostgreSQL database
    of the session's server (skipped, saying why, without PostgreSQL or psycopg)."""
    if backend == "sqlite":
        return ""
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database())


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The module's router with the dashboard, once with each ledger backend."""
    ledger = ledger_database(request, request.param)
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, TOKEN)
    try:
        with running(tmp_path_factory.mktemp(f"dash-{request.param}"), ledger) as e:
            yield e
    finally:
        mp.undo()


@pytest.fixture(params=BACKENDS)
def ledger(request: pytest.FixtureRequest) -> str:
    """A test's own ledger_database, once per backend."""
    return ledger_database(request, request.param)


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def set_cookie(response: httpx.Response, name: str) -> tuple[str, str]:
    """The value and the attributes of the cookie ``name`` that ``response`` sets."""
    for header in response.headers.get_list("set-cookie"):
        key, _, rest = header.partition("=")
        if key.strip() == name:
            value, _, attributes = rest.partition(";")
            return value, attributes
    raise AssertionError(f"the response sets no cookie {name}")


def login(url: str, user: str, password: str | None = None) -> httpx.Client:
    """An HTTP client logged in as ``user``. The session cookie is ``Secure``, which httpx
    keeps from plain-HTTP loopback servers (browsers do not): it is sent by hand here."""
    client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
    page = client.get("/login")
    assert page.status_code == 200
    pre, _ = set_cookie(page, "mercure_login")
    answer = client.post(
        "/login",
        data={"csrf": csrf_of(page.text), "username": user,
              "password": password or PASSWORDS[user], "next": "/"},
        headers={"Cookie": f"mercure_login={pre}"},
    )  # fmt: skip
    assert answer.status_code == 303, answer.text
    sid, _ = set_cookie(answer, "mercure_session")
    client.headers["Cookie"] = f"mercure_session={sid}"
    client.cookies.clear()
    return client


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    return wait_for(condition, timeout, 0.1, what)


def now() -> float:
    return time.time()
