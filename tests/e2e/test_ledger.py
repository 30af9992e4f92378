"""The delivery ledger end to end: a router process, DCMTK's storescu, SQLite and PostgreSQL.

* a series routed to two targets, one failing once: ``mercure job show`` prints the history in
  order, and the per-instance digests match the files at each target (SQLite and PostgreSQL);
* ``mercure find`` by accession, patient ID and SOP Instance UID finds the jobs;
* PostgreSQL stopped while 3 series are routed: all delivered; after it returns every event is
  in the ledger, none twice;
* the router SIGKILLed with events queued: none is lost after restart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    SITE_PLUGINS,
    ProcessFactory,
    folder_of,
    run_cli,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import free_port, make_series
from mercure.testing_postgres import PostgresServer, start_postgres
from pydicom.filereader import read_file_meta_info

pytestmark = [pytest.mark.peer, pytest.mark.slow]

NOT_LEDGER = "receiver,router,dispatcher,cleaner,notifier"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """The ledger_database of a test: SQLite in the spool (the default) or a new PG database."""
    if request.param == "sqlite":
        return ""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for one test, to stop and start again."""
    server = start_postgres(free_port())
    try:
        yield server
    finally:
        server.remove()


def cli_json(cwd: Path, *args: str) -> Any:
    done = run_cli(*args, cwd=cwd)
    assert done.returncode == 0, f"mercure {' '.join(args)}: {done.stdout}{done.stderr}"
    return json.loads(done.stdout)


def history(cwd: Path, config: Path, task_id: str) -> dict[str, Any] | None:
    done = run_cli("job", "show", task_id, "--json", "--config", str(config), cwd=cwd)
    return json.loads(done.stdout) if done.returncode == 0 else None


def event_types(hist: dict[str, Any] | None) -> list[str]:
    return [e["type"] for e in hist["events"]] if hist else []


def found_ids(cwd: Path, config: Path, *criteria: str) -> set[str]:
    done = run_cli("find", *criteria, "--json", "--config", str(config), cwd=cwd)
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["task_id"] for line in done.stdout.splitlines() if line.strip()}


def digests_of(folder: Path) -> dict[str, tuple[str, str]]:
    """{file name: (SOP Instance UID, sha256:...)} of the files a target wrote."""
    return {
        f.name: (
            str(read_file_meta_info(f).MediaStorageSOPInstanceUID),
            "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest(),
        )
        for f in visible_entries(folder)
        if f.is_file()
    }


def test_history_of_a_job_whose_target_fails_once(
    tmp_path: Path, mercure_processes: ProcessFactory, ledger_url: str
) -> None:
    down = tmp_path / "b-is-down"
    down.touch()
    config = spool_config(
        tmp_path,
        retry_delay=1,
        plugin_folder=str(SITE_PLUGINS),
        ledger_database=ledger_url,
        targets={
            "a": {"target_type": "folder", "folder": str(tmp_path / "a")},
            "b": {
                "target_type": "e2e_flaky",
                "folder": str(tmp_path / "b"),
                "journal": str(tmp_path / "b.journal"),
                "down_flag": str(down),
            },
        },
        rules={"ct_to_both": {"rule": "tags.Modality == 'CT'", "target": ["a", "b"]}},
    )
    (tmp_path / "a").mkdir()
    path = write_config(tmp_path / "mercure.json", config)
    mercure_processes.start("router", "run", "--config", str(path))
    series = make_series(tmp_path / "series", 4, AccessionNumber="ACC-LEDGER-1", PatientID="PID-7")
    storescu(series, config["port"])
    wait_until(lambda: (tmp_path / "b.journal").exists(), 60, "the first attempt at b")
    down.unlink()
    success = folder_of(config, "success")
    jobs = wait_until(lambda: len(visible_entries(success)) == 2 and visible_entries(success),
                      60, "both jobs delivered")  # fmt: skip
    by_target = {}
    for job in jobs:
        task = json.loads((job / "task.json").read_text())
        by_target[task["dispatch"]["target_name"]] = job.name
    job_a, job_b = by_target["a"], by_target["b"]

    hist_b = wait_until(
        lambda: "complete" in event_types(h := history(tmp_path, path, job_b)) and h,
        30,
        "job b's history in the ledger",
    )
    assert event_types(hist_b) == ["route", "delay", "dispatch", "complete"]
    attempts = hist_b["attempts"]
    assert [(a["target"], a["delivered"], a["failed"]) for a in attempts] == [
        ("b", 0, 4),
        ("b", 4, 0),
    ]
    assert "test target is down" in attempts[0]["error"]
    assert hist_b["job"]["rules"] == "ct_to_both"
    assert hist_b["series"]["instances"] == 4
    assert job_a in {r["task_id"] for r in hist_b["related"]}

    hist_a = wait_until(
        lambda: "complete" in event_types(h := history(tmp_path, path, job_a)) and h,
        30,
        "job a's history in the ledger",
    )
    assert event_types(hist_a) == ["route", "dispatch", "complete"]
    # Per-instance delivery: UIDs and digests match the files each target holds.
    for job, folder in ((hist_a, tmp_path / "a" / job_a), (hist_b, tmp_path / "b" / job_b)):
        recorded = {d["file"]: (d["sop_instance_uid"], d["digest"]) for d in job["deliveries"]}
        assert recorded == digests_of(folder)
        assert len(recorded) == 4

    # The text history, in order: reception, routing with the rule, both attempts, the retry
    # and the deliveries.
    shown = run_cli("job", "show", job_b, "--instances", "--config", str(path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.split("history (ledger):", 1)[1].splitlines()
    expected = [
        "received  series",
        "routed    rule ct_to_both -> b",
        "attempt   b: 0 delivered, 4 failed: ",
        "retry     1 scheduled",
        "attempt   b: 4 delivered",
        "delivered b: 4 instance(s)",
        "completed",
    ]
    steps = [next((i for i, line in enumerate(lines) if want in line), -1) for want in expected]
    assert -1 not in steps, f"missing steps {expected} in:\n{shown.stdout}"
    assert steps == sorted(steps), shown.stdout
    for uid, digest in digests_of(tmp_path / "b" / job_b).values():
        assert f"b  {uid}  {digest}" in shown.stdout

    # mercure find: by accession, by patient ID, by one instance's SOP Instance UID.
    both = {job_a, job_b}
    assert found_ids(tmp_path, path, "--accession", "ACC-LEDGER-1") == both
    assert found_ids(tmp_path, path, "--patient-id", "PID-7") == both
    sop = str(read_file_meta_info(series[2]).MediaStorageSOPInstanceUID)
    assert found_ids(tmp_path, path, "--sop", sop) == both
    assert found_ids(tmp_path, path, "--accession", "NO-SUCH-ACC") == set()


def _all_complete(cwd: Path, config: Path, job_ids: list[str]) -> bool:
    return all(event_types(history(cwd, config, j)) == ["route", "dispatch", "complete"]
               for j in job_ids)  # fmt: skip


def test_postgresql_down_while_series_are_routed(
    tmp_path: Path, mercure_processes: ProcessFactory, own_postgres: PostgresServer
) -> None:
    url = own_postgres.create_database()
    config = spool_config(
        tmp_path,
        ledger_database=url,
        targets={"a": {"target_type": "folder", "folder": str(tmp_path / "a")}},
        rules={"all": {"rule": "True", "target": "a"}},
    )
    (tmp_path / "a").mkdir()
    path = write_config(tmp_path / "mercure.json", config)
    router = mercure_processes.start("router", "run", "--config", str(path))
    # The schema is migrated at start; then the server goes away.
    wait_until(lambda: "ledger schema migrated" in router.output(), 30, "the migration")
    own_postgres.stop()
    for i in range(3):
        storescu(make_series(tmp_path / f"s{i}", 3), config["port"])
    success = folder_of(config, "success")
    wait_until(lambda: len(visible_entries(success)) == 3, 60, "3 series delivered")
    job_ids = [j.name for j in visible_entries(success)]
    assert history(tmp_path, path, job_ids[0]) is None  # the ledger cannot be read now
    own_postgres.start()
    wait_until(lambda: _all_complete(tmp_path, path, job_ids), 120, "the history after the outage")
    router.terminate()
    # None twice: each job exactly once routed, delivered and completed; no event id twice.
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT task_id, type, COUNT(*) FROM events WHERE kind = 'task' GROUP BY task_id, type"
        ).fetchall()
        ids = conn.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events").fetchone()
    assert sorted(rows) == sorted(
        (j, t, 1) for j in job_ids for t in ("route", "dispatch", "complete")
    )
    assert ids is not None and ids[0] == ids[1]


def test_router_killed_with_events_queued_loses_none(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    config = spool_config(
        tmp_path,
        targets={"a": {"target_type": "folder", "folder": str(tmp_path / "a")}},
        rules={"all": {"rule": "True", "target": "a"}},
    )
    (tmp_path / "a").mkdir()
    path = write_config(tmp_path / "mercure.json", config)
    # No ledger service: every event stays in the queue.
    router = mercure_processes.start("router", "run", "--config", str(path), "--only", NOT_LEDGER)
    for i in range(2):
        storescu(make_series(tmp_path / f"s{i}", 3), config["port"])
    success = folder_of(config, "success")
    wait_until(lambda: len(visible_entries(success)) == 2, 60, "2 series delivered")
    queue = Path(config["outgoing_folder"]).parent / "ledger" / "queue"
    wait_until(
        lambda: sum(p.read_bytes().count(b'"type":"complete"') for p in queue.glob("*.log")) == 2,
        30,
        "the completions queued",
    )
    router.kill()
    job_ids = [j.name for j in visible_entries(success)]
    assert not (queue.parent / "ledger.sqlite3").exists()
    mercure_processes.start("ledger", "run", "--config", str(path), "--only", "ledger")
    wait_until(lambda: _all_complete(tmp_path, path, job_ids), 60, "the queued history written")
    status = run_cli("ledger", "status", "--config", str(path), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "reader ledger: 0 bytes behind" in status.stdout
