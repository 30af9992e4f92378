"""Dashboard server time with a large ledger: queue and find pages with 100,000 jobs.

A SQLite ledger (migrated by the core, so with its indexes) is filled with N jobs over 30
days: each a received series, a routing event, a dispatch attempt, a delivery event and a
completion, a tenth of them in error. The dashboard's ASGI application (logged in as an
operator, in this process, no network) then serves each page R times; the figure is the
median server time per page. The reference, measured in the same run, is the same pages over a
ledger of 1,000 jobs: ``ratio`` = time with N jobs / time with 1,000 (1.0: the page does not
slow down as the ledger grows; the goal is at most 2). A third run drops the indexes added for
the dashboard (ledger schema 2) to show what they are for.

Usage: python bench/web.py [--jobs 100000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    "find accession": None,
    "find patient": None,
    "job": None,
}


def fill(db: Any, jobs: int, seed: int = 7) -> dict[str, str]:
    """Write ``jobs`` jobs into the ledger; return sample values to look up."""
    rng = random.Random(seed)
    now = time.time()
    span = 30 * 86400
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


def measure(base: Path, jobs: int, repeat: int, *, drop_indexes: bool = False) -> dict[str, float]:
    import httpx
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
    )
    config, _ = validate_config(data, pm.registry)
    db = LedgerSettings.of(config).database_handle()
    migrate(db)
    samples = fill(db, jobs)
    if drop_indexes:
        for name in ("jobs_state_created", "jobs_created", "jobs_study", "attempts_target",
                     "events_kind"):  # fmt: skip
            db.execute(f"DROP INDEX IF EXISTS {name}")
    db.execute("ANALYZE")
    db.close()
    users = base / "users.json"
    UsersFile(users).set_password("bench", "bench-password-1", "operator")
    settings = WebSettings(users_file=str(users), secure_cookies=False)
    app = create_app(build_runtime(config, pm, fsync=False), settings)

    async def run() -> dict[str, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
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
            times: dict[str, float] = {}
            for name, path in paths.items():
                assert path is not None
                answer = await c.get(path)
                if answer.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {answer.status_code}")
                spent = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    answer = await c.get(path)
                    spent.append(time.perf_counter() - start)
                    assert answer.status_code == 200
                times[name] = statistics.median(spent) * 1000
            return times

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with workdir("web") as base:
        reference = measure(base / "small", 1000, args.repeat)
        large = measure(base / "large", args.jobs, args.repeat)
        unindexed = measure(base / "unindexed", args.jobs, max(3, args.repeat // 5),
                            drop_indexes=True)  # fmt: skip
    print(f"server time per page, median of {args.repeat} (ms):")
    print(f"{'page':<16} {'1,000 jobs':>11} {f'{args.jobs:,} jobs':>14} {'ratio':>6}"
          f" {'no dashboard indexes':>21}")  # fmt: skip
    ratios = {}
    for name in reference:
        ratio = large[name] / reference[name]
        ratios[name] = round(ratio, 2)
        print(f"{name:<16} {reference[name]:>11.1f} {large[name]:>14.1f} {ratio:>6.2f}"
              f" {unindexed[name]:>21.1f}")  # fmt: skip
    report(
        "web",
        {
            "jobs": args.jobs,
            "reference_jobs": 1000,
            "ms_reference": {k: round(v, 2) for k, v in reference.items()},
            "ms": {k: round(v, 2) for k, v in large.items()},
            "ms_without_dashboard_indexes": {k: round(v, 2) for k, v in unindexed.items()},
            "ratio": ratios,
            "goal_ratio_max": 2,
            "met": all(r <= 2 for r in ratios.values()),
        },
    )
    json.dumps(ratios)


if __name__ == "__main__":
    main()
