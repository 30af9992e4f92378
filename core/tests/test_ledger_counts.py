"""Ledger schema 3: jobs per state kept by triggers, migrated from schema 2 with jobs in it,
on SQLite and PostgreSQL; several PostgreSQL connections each keep their own counter rows,
folded by the compaction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mercure.events import TaskEvent, TaskEventType
from mercure.ledger.db import Database
from mercure.ledger.queue import Position, QueuedRecord
from mercure.ledger.records import LedgerRecord, task_record
from mercure.ledger.schema import (
    LATEST,
    compact_job_counts,
    current_version,
    job_counts,
    migrate,
)
from mercure.ledger.writer import apply_retention, write_batch


def _event(task: str, kind: TaskEventType, time: float | None = None) -> LedgerRecord:
    tags = {"SeriesInstanceUID": f"1.2.{task}", "PatientID": "P1"}
    record = task_record(TaskEvent(kind, task, f"1.2.{task}", "pacs", 2, tags=tags))
    if time is not None:
        from dataclasses import replace

        assert record.task is not None
        record = replace(record, task=replace(record.task, time=time))
    return record


class Writer:
    """Writes records through the ledger writer, as the ledger service does."""

    def __init__(self, db: Database, queue_id: str) -> None:
        self.db = db
        self.queue_id = queue_id
        self.position = Position(1, 0)

    def write(self, *records: LedgerRecord) -> None:
        items = []
        for record in records:
            self.position = Position(1, self.position.offset + 1)
            items.append(QueuedRecord(record.to_json(), self.position))
        start = Position(1, self.position.offset - len(records))
        assert write_batch(self.db, self.queue_id, start, items) is not None


def counted(db: Database) -> dict[str, int]:
    rows = db.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    return {str(r["state"]): int(r["n"]) for r in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database())


def connect(url: str) -> Database:
    return Database("postgresql" if url.startswith("postgresql") else "sqlite", url)


@pytest.fixture
def schema2(url: str) -> Iterator[Database]:
    """A ledger at schema 2 holding jobs in three states (written by the schema-2 writer)."""
    db = connect(url)
    migrate(db, upto=2)
    writer = Writer(db, "old")
    writer.write(*[_event(f"a{i}", TaskEventType.ROUTED) for i in range(5)])
    writer.write(_event("a0", TaskEventType.COMPLETED), _event("a1", TaskEventType.COMPLETED),
                 _event("a2", TaskEventType.MOVED_TO_ERROR))  # fmt: skip
    yield db
    db.close()


def test_schema_3_counts_the_jobs_already_there_and_keeps_counting(schema2: Database) -> None:
    db = schema2
    assert current_version(db) == 2
    before = counted(db)
    assert before == {"outgoing": 2, "success": 2, "error": 1}
    assert job_counts(db) == before  # schema 2: counted over the jobs
    assert migrate(db) == list(range(3, LATEST + 1))
    assert job_counts(db) == before
    writer = Writer(db, "new")
    writer.write(_event("b0", TaskEventType.ROUTED, time=1000.0),
                 _event("b1", TaskEventType.ROUTED), _event("a3", TaskEventType.COMPLETED),
                 _event("a2", TaskEventType.MANUAL_RETRY),
                 _event("a2", TaskEventType.COMPLETED))  # fmt: skip
    assert job_counts(db) == counted(db) == {"outgoing": 3, "success": 4}
    # The same state written again (a retry scheduled while outgoing) changes no count.
    writer.write(_event("b1", TaskEventType.RETRY_SCHEDULED))
    assert job_counts(db) == {"outgoing": 3, "success": 4}
    # Retention deletes old jobs: their counts go with them.
    assert apply_retention(db, 3600) >= 1
    assert job_counts(db) == counted(db) == {"outgoing": 2, "success": 4}
    compact_job_counts(db)
    assert job_counts(db) == counted(db)
    assert int(db.scalar("SELECT COUNT(*) FROM job_counts")) == 2


def test_each_postgresql_connection_keeps_its_own_counters(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: one counter row per state")
    first, second = connect(url), connect(url)
    try:
        migrate(first)
        Writer(first, "host-a").write(_event("c0", TaskEventType.ROUTED),
                                      _event("c1", TaskEventType.ROUTED))  # fmt: skip
        # Another host's writer completes a job the first one created.
        Writer(second, "host-b").write(_event("c0", TaskEventType.COMPLETED))
        rows = first.query("SELECT state, shard, n FROM job_counts ORDER BY shard, state")
        assert len({r["shard"] for r in rows}) == 2
        assert job_counts(first) == counted(first) == {"outgoing": 1, "success": 1}
        compact_job_counts(second)
        assert first.scalar("SELECT COUNT(*) FROM job_counts") == 2
        assert job_counts(first) == {"outgoing": 1, "success": 1}
        Writer(first, "host-a2").write(_event("c1", TaskEventType.MOVED_TO_ERROR))
        assert job_counts(second) == counted(second) == {"error": 1, "success": 1}
    finally:
        first.close()
        second.close()
