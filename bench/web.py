"""Dashboard server time with a large ledger: every page with 100,000 jobs, SQLite and PostgreSQL.

A ledger (migrated by the core, so with its indexes and its triggers) is filled with N jobs at
one job every 26 s, the newest now (100,000 jobs: 30 days of history): each a received series,
a routing event, a dispatch attempt, a delivery event and a completion, a tenth of them in
error. The rate is the same at every size, so the overview's plot (the last hours) has the same
traffic to draw: what grows is the history. The dashboard's ASGI application (logged in as an
operator, in this process, no network) then serves each page R times; the figure is the median
server time per page. The reference, measured in the same run on the same backend, is the same
pages over a ledger of 1,000 jobs, their requests alternating with those to the large one (so
that load from elsewhere on the machine hits both alike): ``ratio`` = time with N jobs / time
with 1,000 (1.0: the page does not slow down as the ledger grows; the goal is at most 2). On
SQLite a third run drops the indexes added for the dashboard (ledger schemas 2 and 3) to show
what they are for.

PostgreSQL is Debian's server, started for the run on a free loopback port (as the tests do,
``mercure.testing_postgres``); without it (or psycopg) only SQLite is measured.

Usage: python bench/web.py [--jobs 100000] [--repeat 20] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import report, spool_config, workdir

TARGETS = ("pacs", "archive", "research")
PAGES = {
    "overview": "/",
    "queue": "/queue",
    "queue error": "/queue?state=error",
    "queue page 15": None,  # filled in: the 15th page, by cursor
    "queue target": "/queue?target=research",
    "find accession": None,
    "find patient": None,
    "job": None,
    "plot": "/plot.svg",
    "studies": "/studies",
    "rules": "/rules",
    "targets": "/targets",
    "configuration": "/configuration",
}
SECONDS_PER_JOB = 26.0
DASHBOARD_INDEXES = ("jobs_state_created", "jobs_created", "jobs_study", "attempts_target",
                     "events_kind", "jobs_children", "attempts_target_ok",
                     "attempts_target_failed")  # fmt: skip


def fill(db: Any, jobs: int, seed: int = 7) -> dict[str, str]:
    """Write ``jobs`` jobs into the ledger; return sample values to look up."""
    rng = random.Random(seed)
    now = time.time()
    span = SECONDS_PER_JOB * jobs
    samples: dict[str, str] = {}
    series_rows, job_rows, event_rows, attempt_rows = [], [], [], []
    for i in range(jobs):
        created = now - span + span * i / jobs
        task_id = str(uuid.UUID(int=rng.getrandbits(128)))
        series_uid = f"1.2.826.0.1.3680043.10.{i}"
        patient, accession = f"PID{i % 20000:06d}", f"ACC{i:08d}"
        target = TARGETS[i % 3]
        state = "error" if i % 10 == 0 else "success"
        n = 20 + i % 200
        series_rows.append([series_uid, f"1.2.3.{i // 4}", patient, f"Doe^{i}", accession, "CT",
                            "bench", "MOD1", "10.0.0.1", n, created, created, "{}"])  # fmt: skip
        job_rows.append([task_id, "", series_uid, f"1.2.3.{i // 4}", patient, accession,
                         "route", "all", target, state,
                         "gave up after 3 tries" if state == "error" else "", n, created,
                         created + 5, created, "{}", "{}"])  # fmt: skip
        for offset, kind in ((0, "route"), (4, "dispatch"), (5, "complete")):
            if state == "error" and kind != "route":
                kind = "error" if kind == "complete" else "delay"
            event_rows.append([uuid.uuid4().hex, "task", kind, created + offset, task_id,
                               series_uid, target, n, "", "all", "bench", "", "{}"])  # fmt: skip
        attempt_rows.append([uuid.uuid4().hex, task_id, target, created + 4,
                             0 if state == "error" else n, n if state == "error" else 0,
                             "refused" if state == "error" else ""])  # fmt: skip
        if i == jobs // 2:
            samples = {"accession": accession, "patient": patient, "task": task_id}
    with db.transaction():
        db.executemany(
            "INSERT INTO series (series_uid, study_uid, patient_id, patient_name, accession, "
            "modality, series_description, sender_aet, sender_address, instances, first_seen, "
            "last_seen, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            series_rows,
        )
        db.executemany(
            "INSERT INTO jobs (task_id, parent_id, series_uid, study_uid, patient_id, accession, "
            "action, rules, targets, state, error, instances, created, updated, routed_at, "
            "task, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            job_rows,
        )
        db.executemany(
            "INSERT INTO events (event_id, kind, type, time, task_id, series_uid, target, "
            "file_count, info, rule, host, service, extra) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            event_rows,
        )
        db.executemany(
            "INSERT INTO dispatch_attempts (event_id, task_id, target, time, delivered, failed, "
            "error) VALUES (?, ?, ?, ?, ?, ?, ?)",
            attempt_rows,
        )
        for service in ("receiver", "router", "dispatcher", "ledger"):
            db.execute(
                "INSERT INTO events (event_id, kind, type, time, host, service, extra) "
                "VALUES (?, 'service', 'BOOT', ?, 'bench', ?, '{}')",
                [uuid.uuid4().hex, now - 3600, service],
            )
    return samples


def prepare(base: Path, jobs: int, *, database: str = "", drop_indexes: bool = False) -> Any:
    """A dashboard application over a ledger of ``jobs`` jobs, and the sample values."""
    from mercure.config import validate_config
    from mercure.ledger import LedgerSettings
    from mercure.ledger.schema import migrate
    from mercure.plugins import build_plugin_manager
    from mercure.services.runtime import build_runtime
    from mercure_web_dashboard.app import create_app
    from mercure_web_dashboard.settings import WebSettings
    from mercure_web_dashboard.users import UsersFile

    base.mkdir(parents=True)
    pm = build_plugin_manager()
    data = spool_config(
        base,
        targets={t: {"target_type": "folder", "folder": str(base / t)} for t in TARGETS},
        rules={"all": {"rule": "True", "target": "pacs"}},
        ledger_database=database,
    )
    config, _ = validate_config(data, pm.registry)
    db = LedgerSettings.of(config).database_handle()
    migrate(db)
    samples = fill(db, jobs)
    if drop_indexes:
        for name in DASHBOARD_INDEXES:
            db.execute(f"DROP INDEX IF EXISTS {name}")
    db.execute("ANALYZE")
    db.close()
    users = base / "users.json"
    UsersFile(users).set_password("bench", "bench-password-1", "operator")
    settings = WebSettings(users_file=str(users), secure_cookies=False)
    return create_app(build_runtime(config, pm, fsync=False), settings), samples


async def _client(app: Any, samples: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """A logged-in client of ``app`` and the path of each page."""
    import httpx

    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
    page = await c.get("/login")
    token = page.text.split('name="csrf" value="')[1].split('"')[0]
    await c.post("/login", data={"csrf": token, "username": "bench",
                                 "password": "bench-password-1"})  # fmt: skip
    paths = dict(PAGES)
    cursor_page = "/queue"
    for _ in range(14):
        html = (await c.get(cursor_page)).text
        cursor_page = html.split('id="next-page" href="')[1].split('"')[0]
        cursor_page = cursor_page.replace("&amp;", "&")
    paths["queue page 15"] = cursor_page
    paths["find accession"] = f"/find?accession={samples['accession']}"
    paths["find patient"] = f"/find?patient_id={samples['patient']}"
    paths["job"] = f"/jobs/{samples['task']}"
    return c, {k: v for k, v in paths.items() if v is not None}


def measure(prepared: list[Any], repeat: int) -> list[dict[str, float]]:
    """Median server time (ms) of each page of each application. The applications' requests
    alternate (in turn, the order switching every round), so that a burst of load on a shared
    machine falls on all of them alike and the ratios stay fair."""

    async def run() -> list[dict[str, float]]:
        clients = [await _client(app, samples) for app, samples in prepared]
        try:
            spent: list[dict[str, list[float]]] = [{} for _ in clients]
            for name in clients[0][1]:
                for c, paths in clients:
                    answer = await c.get(paths[name])  # warm up
                    if answer.status_code != 200:
                        raise SystemExit(f"{paths[name]}: HTTP {answer.status_code}")
                for r in range(repeat):
                    order = list(range(len(clients)))
                    if r % 2:
                        order.reverse()
                    for i in order:
                        c, paths = clients[i]
                        start = time.perf_counter()
                        answer = await c.get(paths[name])
                        spent[i].setdefault(name, []).append(time.perf_counter() - start)
                        assert answer.status_code == 200
            return [{k: statistics.median(v) * 1000 for k, v in one.items()} for one in spent]
        finally:
            for c, _ in clients:
                await c.aclose()

    return asyncio.run(run())


def postgres() -> Any:
    """A PostgreSQL server for the run, or None (saying why)."""
    from common import free_port
    from mercure.testing_postgres import start_postgres

    try:
        return start_postgres(free_port())
    except BaseException as exc:  # pytest.skip's exception when it is not installed
        print(f"PostgreSQL not measured: {exc}")
        return None


def table(title: str, reference: dict[str, float], large: dict[str, float], jobs: int,
          repeat: int, unindexed: dict[str, float] | None = None) -> dict[str, float]:  # fmt: skip
    print(f"{title}: server time per page, median of {repeat} (ms):")
    extra = " no dashboard indexes" if unindexed else ""
    print(f"{'page':<16} {'1,000 jobs':>11} {f'{jobs:,} jobs':>14} {'ratio':>6}{extra}")
    ratios = {}
    for name in reference:
        ratio = large[name] / reference[name]
        ratios[name] = round(ratio, 2)
        more = f" {unindexed[name]:>20.1f}" if unindexed else ""
        print(f"{name:<16} {reference[name]:>11.1f} {large[name]:>14.1f} {ratio:>6.2f}{more}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    figures: dict[str, Any] = {"jobs": args.jobs, "reference_jobs": 1000, "goal_ratio_max": 2}
    met = True
    with workdir("web") as base:
        if args.backend in ("sqlite", "both"):
            reference, large = measure(
                [prepare(base / "small", 1000), prepare(base / "large", args.jobs)], args.repeat
            )
            [unindexed] = measure([prepare(base / "unindexed", args.jobs, drop_indexes=True)],
                                  max(3, args.repeat // 5))  # fmt: skip
            ratios = table("SQLite", reference, large, args.jobs, args.repeat, unindexed)
            met = met and all(r <= 2 for r in ratios.values())
            figures["sqlite"] = {
                "ms_reference": {k: round(v, 2) for k, v in reference.items()},
                "ms": {k: round(v, 2) for k, v in large.items()},
                "ms_without_dashboard_indexes": {k: round(v, 2) for k, v in unindexed.items()},
                "ratio": ratios,
            }
        server = postgres() if args.backend in ("postgresql", "both") else None
        if server is not None:
            try:
                small = prepare(base / "pg-small", 1000, database=server.create_database())
                big = prepare(base / "pg-large", args.jobs, database=server.create_database())
                reference, large = measure([small, big], args.repeat)
            finally:
                server.remove()
            ratios = table("PostgreSQL", reference, large, args.jobs, args.repeat)
            met = met and all(r <= 2 for r in ratios.values())
            figures["postgresql"] = {
                "ms_reference": {k: round(v, 2) for k, v in reference.items()},
                "ms": {k: round(v, 2) for k, v in large.items()},
                "ratio": ratios,
            }
    figures["met"] = met
    report("web", figures)


if __name__ == "__main__":
    main()
