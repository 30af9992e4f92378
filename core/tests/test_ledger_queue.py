"""The ledger queue and writer: order across processes and segments, torn records, cursors,
exactly-once batches, retention, migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mercure.events import TaskEvent, TaskEventType
from mercure.ledger.db import Database
from mercure.ledger.queue import EventQueue, Position
from mercure.ledger.records import LedgerRecord, task_record
from mercure.ledger.schema import LATEST, SchemaTooNew, current_version, migrate
from mercure.ledger.writer import apply_retention, stored_cursor, write_batch


def read_all(queue: EventQueue, start: Position | None = None) -> list[dict]:
    position = start or queue.start()
    found: list[dict] = []
    while True:
        records, position = queue.read(position, 7)
        if not records:
            return found
        found.extend(r.data for r in records)


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    queue = EventQueue(tmp_path / "q", fsync=False, segment_bytes=600)
    for i in range(50):
        queue.append({"n": i, "pad": "x" * 40})
    assert len(queue.segments()) > 3
    assert [r["n"] for r in read_all(queue)] == list(range(50))


WRITER = """
import sys
from pathlib import Path
from mercure.ledger.queue import EventQueue
queue = EventQueue(Path(sys.argv[1]), fsync=False, segment_bytes=4000)
for i in range(200):
    queue.append({"who": int(sys.argv[2]), "i": i})
"""


def test_processes_append_concurrently_without_losing_or_mixing(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    EventQueue(folder, fsync=False)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(w)]) for w in range(4)
    ]
    for p in procs:
        assert p.wait(60) == 0
    got = read_all(EventQueue(folder, fsync=False, segment_bytes=4000))
    assert len(got) == 800
    for w in range(4):  # each writer's records in its own order
        assert [r["i"] for r in got if r["who"] == w] == list(range(200))


def test_a_torn_record_is_skipped_and_the_next_writer_closes_it(tmp_path: Path) -> None:
    queue = EventQueue(tmp_path / "q", fsync=False)
    queue.append({"n": 1})
    segment = queue.segment_path(queue.segments()[-1])
    with open(segment, "ab") as fh:
        fh.write(b'1234abcd {"n": 2, "torn')  # a writer killed in the middle of its line
    assert [r["n"] for r in read_all(queue)] == [1]  # the partial line is not read yet
    fresh = EventQueue(tmp_path / "q", fsync=False)  # the next process
    fresh.append({"n": 3})
    assert [r["n"] for r in read_all(fresh)] == [1, 3]


def test_cursors_and_trimming(tmp_path: Path) -> None:
    queue = EventQueue(tmp_path / "q", fsync=False, segment_bytes=300)
    for i in range(30):
        queue.append({"n": i, "pad": "y" * 30})
    segments = queue.segments()
    records, position = queue.read(queue.start(), 20)
    queue.save_cursor("ledger", position)
    assert queue.trim(["ledger", "monitor-x"]) == 0  # monitor-x has no cursor: keeps all
    queue.save_cursor("monitor-x", queue.start())
    assert queue.trim(["ledger", "monitor-x"]) == 0
    queue.save_cursor("monitor-x", position)
    removed = queue.trim(["ledger", "monitor-x"])
    assert removed > 0 and queue.segments()[0] == position.segment
    assert queue.segments()[-1] == segments[-1]
    rest = read_all(queue, position)
    assert [r.data["n"] for r in records] + [r["n"] for r in rest] == list(range(30))


def _event(task: str, kind: TaskEventType = TaskEventType.ROUTED, **extra: object) -> LedgerRecord:
    tags = {"SeriesInstanceUID": "1.2.3", "PatientID": "P1", "AccessionNumber": "A1"}
    return task_record(TaskEvent(kind, task, "1.2.3", "pacs", 3, rule="r", tags=tags, extra=extra))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "sqlite":
        db = Database("sqlite", str(tmp_path / "ledger.sqlite3"))
    else:
        server = request.getfixturevalue("postgres_server")
        db = Database("postgresql", server.create_database())
    migrate(db)
    yield db
    db.close()


def test_a_batch_is_written_once_with_its_cursor(tmp_path: Path, database: Database) -> None:
    queue = EventQueue(tmp_path / "q", fsync=False)
    for record in (_event("t1"), _event("t1", TaskEventType.COMPLETED), _event("t2")):
        queue.append(record.to_json())
    records, end = queue.read(queue.start(), 100)
    assert write_batch(database, queue.queue_id, queue.start(), records, end) == end
    assert stored_cursor(database, queue.queue_id) == end
    # The same batch again (a writer that crashed before it saved its own cursor): refused,
    # and even written from a stale start the events are not doubled.
    assert write_batch(database, queue.queue_id, queue.start(), records, end) is None
    assert write_batch(database, queue.queue_id, end, records, end) == end
    assert database.scalar("SELECT COUNT(*) FROM events") == 3
    assert database.scalar("SELECT state FROM jobs WHERE task_id = 't1'") == "success"
    assert database.scalar("SELECT COUNT(*) FROM jobs") == 2


def test_retention_deletes_only_old_history(database: Database) -> None:
    old = _event("old")
    new = _event("new")
    from dataclasses import replace

    assert old.task is not None
    old = replace(old, task=replace(old.task, time=1000.0))
    queue_id = "q1"
    from mercure.ledger.queue import QueuedRecord

    items = [QueuedRecord(r.to_json(), Position(1, i + 1)) for i, r in enumerate((old, new))]
    write_batch(database, queue_id, Position(1, 0), items)
    assert apply_retention(database, 3600) >= 2  # the old event and its job
    assert [r["task_id"] for r in database.query("SELECT task_id FROM jobs")] == ["new"]
    assert apply_retention(database, 0) == 0  # 0 keeps everything


def test_migrations_are_versioned_and_a_newer_schema_is_refused(database: Database) -> None:
    assert current_version(database) == LATEST
    assert migrate(database) == []
    with database.transaction():
        database.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            [LATEST + 1, "from the future", 0.0],
        )
    with pytest.raises(SchemaTooNew, match="upgrade mercure-core"):
        migrate(database)


def test_records_survive_the_round_trip() -> None:
    record = _event("t9", TaskEventType.DELIVERED, instances=[{"file": "a.dcm"}])
    again = LedgerRecord.from_json(record.to_json())
    assert again.task is not None and again.task.extra["instances"] == [{"file": "a.dcm"}]
    assert again.task.tags == {}  # a delivery's record does not repeat the series' tags
    assert again.id == record.id and again.pid == os.getpid()
    with pytest.raises(ValueError):
        LedgerRecord.from_json({"kind": "task"})
