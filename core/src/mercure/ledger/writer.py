"""Writes queue records into the ledger database: the events, and the tables derived from them.

One batch of records is one transaction together with the queue's cursor, so the database
holds each record exactly once: after a crash or an outage the batch is written again from
the cursor the database itself kept, and records already present (by ``event_id``) are
skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.ledger.db import Database
from mercure.ledger.queue import Position, QueuedRecord
from mercure.ledger.records import HOST, LedgerRecord
from mercure.logs import get_logger

log = get_logger("mercure.ledger")

MAX_LOG_CHARS = 1_000_000
"""Longer processing logs are cut (keeping the end) so one run cannot bloat the ledger."""

# Events that create a job, and the state the job is then in.
CREATED: dict[str, str] = {
    TaskEventType.ROUTED: "outgoing",
    TaskEventType.QUEUED_FOR_PROCESSING: "processing",
    TaskEventType.DISCARDED: "discard",
    TaskEventType.NOTIFICATION: "discard",
}
STATE_AFTER: dict[str, str] = {
    TaskEventType.COMPLETED: "success",
    TaskEventType.MOVED_TO_ERROR: "error",
    TaskEventType.RETRY_SCHEDULED: "outgoing",
    TaskEventType.MANUAL_RETRY: "outgoing",
    TaskEventType.MANUAL_DISCARD: "discard",
    "process_begin": "processing",
    "process_fail": "error",
}
SERVICES: dict[str, str] = {
    TaskEventType.ROUTED: "router",
    TaskEventType.QUEUED_FOR_PROCESSING: "router",
    TaskEventType.DISCARDED: "router",
    TaskEventType.NOTIFICATION: "router",
    TaskEventType.REGISTERED: "router",
    TaskEventType.DELIVERED: "dispatcher",
    TaskEventType.DELIVERY_FAILED: "dispatcher",
    TaskEventType.RETRY_SCHEDULED: "dispatcher",
    TaskEventType.MOVED_TO_ERROR: "dispatcher",
    TaskEventType.COMPLETED: "dispatcher",
    TaskEventType.MANUAL_RETRY: "cli",
    TaskEventType.MANUAL_DISCARD: "cli",
    TaskEventType.SUSPENDED: "cli",
    TaskEventType.RESUMED: "cli",
    TaskEventType.STUDY_FORCE_REQUESTED: "cli",
    TaskEventType.STUDY_COLLECTED: "router",
    TaskEventType.STUDY_RELEASED: "router",
    TaskEventType.NOTIFICATION_SENT: "notifier",
    TaskEventType.NOTIFICATION_GIVEN_UP: "notifier",
}


def service_of(event: TaskEvent) -> str:
    """Which service reported ``event`` (``extra["service"]`` wins, e.g. the processor)."""
    given = event.extra.get("service")
    if isinstance(given, str) and given:
        return given
    kind = str(event.type)
    if kind.startswith("process"):
        return "processor"
    return SERVICES.get(kind, "")


def stored_cursor(db: Database, queue_id: str) -> Position | None:
    rows = db.query("SELECT segment, position FROM ledger_cursors WHERE queue_id = ?", [queue_id])
    if not rows:
        return None
    return Position(int(rows[0]["segment"]), int(rows[0]["position"]))


def write_batch(
    db: Database,
    queue_id: str,
    start: Position,
    records: Sequence[QueuedRecord],
    end: Position | None = None,
) -> Position | None:
    """Write ``records`` (read from ``start``) and move the cursor to ``end``, in one
    transaction (``end`` defaults to the position after the last record).

    Returns the new cursor, or ``None`` when the database's cursor is not ``start`` (another
    writer moved it, or it was restored): the caller reads again from :func:`stored_cursor`.
    """
    if end is None:
        if not records:
            return start
        end = records[-1].end
    with db.transaction():
        if db.backend == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", [queue_id])
        current = stored_cursor(db, queue_id)
        if current is not None and current != start:
            return None
        parsed: list[LedgerRecord] = []
        for item in records:
            try:
                parsed.append(LedgerRecord.from_json(item.data))
            except ValueError as exc:
                log.warning("ledger: a queue record could not be read; skipped", error=str(exc))
        ids = [r.id for r in parsed]
        present = _present(db, ids)
        for record in parsed:
            if record.id not in present:
                present.add(record.id)
                apply_record(db, record)
        db.execute(
            "INSERT INTO ledger_cursors (queue_id, segment, position, host, updated) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (queue_id) DO UPDATE SET "
            "segment = excluded.segment, position = excluded.position, host = excluded.host, "
            "updated = excluded.updated",
            [queue_id, end.segment, end.offset, HOST, time.time()],
        )
    return end


def _present(db: Database, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        marks = ", ".join("?" for _ in part)
        rows = db.query(f"SELECT event_id FROM events WHERE event_id IN ({marks})", part)
        found.update(str(r["event_id"]) for r in rows)
    return found


def _json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)


def apply_record(db: Database, record: LedgerRecord) -> None:
    """Insert one record's event row and update the derived tables."""
    if record.service is not None:
        s = record.service
        db.execute(
            "INSERT INTO events (event_id, kind, type, time, info, host, service, extra) "
            "VALUES (?, 'service', ?, ?, ?, ?, ?, ?)",
            [record.id, s.event, s.time, s.description, record.host, s.service,
             _json({"severity": s.severity, "pid": record.pid})],
        )  # fmt: skip
        return
    e = record.task
    assert e is not None
    kind = str(e.type)
    extra = dict(e.extra)
    extra.pop("task", None)  # kept once, in jobs.task
    instances = extra.pop("instances", None)
    extra.pop("result", None)
    extra.pop("log", None)
    db.execute(
        "INSERT INTO events (event_id, kind, type, time, task_id, series_uid, target, "
        "file_count, info, rule, host, service, extra) "
        "VALUES (?, 'task', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [record.id, kind, e.time, e.task_id, e.series_uid, e.target, e.file_count, e.info,
         e.rule, record.host, service_of(e), _json(extra)],
    )  # fmt: skip
    if kind in CREATED:
        _series(db, e)
        _job_created(db, e, CREATED[kind])
    elif kind in STATE_AFTER and e.task_id:
        error = e.info if STATE_AFTER[kind] == "error" else ""
        db.execute(
            "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE task_id = ?",
            [STATE_AFTER[kind], error, e.time, e.task_id],
        )
    for attempt in e.extra.get("attempts") or []:
        if not isinstance(attempt, dict):
            continue
        db.execute(
            "INSERT INTO dispatch_attempts (event_id, task_id, target, time, delivered, failed, "
            "error) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [record.id, e.task_id, str(attempt.get("target", "")),
             float(attempt.get("at") or e.time), int(attempt.get("delivered") or 0),
             int(attempt.get("failed") or 0), str(attempt.get("error") or "")],
        )  # fmt: skip
    if kind == TaskEventType.DELIVERED and isinstance(instances, list):
        db.executemany(
            "INSERT INTO deliveries (event_id, task_id, target, file, sop_instance_uid, digest, "
            "size, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                [
                    record.id,
                    e.task_id,
                    e.target,
                    str(i.get("file", "")),
                    str(i.get("sop_instance_uid", "")),
                    str(i.get("digest", "")),
                    int(i.get("size") or 0),
                    e.time,
                ]
                for i in instances
                if isinstance(i, dict)
            ],
        )
    if kind in ("process_module_complete", "process_fail"):
        _processing_run(db, record.id, e)
    if kind in (TaskEventType.NOTIFICATION_SENT, TaskEventType.NOTIFICATION_GIVEN_UP):
        outcome = "delivered" if kind == TaskEventType.NOTIFICATION_SENT else "given up"
        db.execute(
            "INSERT INTO notifications (event_id, task_id, rule, notifier, outcome, detail, "
            "tries, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [record.id, e.task_id, e.rule, e.target, outcome, e.info,
             int(e.extra.get("tries") or 0), e.time],
        )  # fmt: skip


def _series(db: Database, e: TaskEvent) -> None:
    tags = e.tags
    uid = e.series_uid or tags.get("SeriesInstanceUID", "")
    if not uid:
        return
    db.execute(
        "INSERT INTO series (series_uid, study_uid, patient_id, patient_name, accession, "
        "modality, series_description, sender_aet, sender_address, instances, first_seen, "
        "last_seen, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (series_uid) DO UPDATE SET last_seen = excluded.last_seen, "
        "instances = CASE WHEN excluded.instances > series.instances "
        "THEN excluded.instances ELSE series.instances END, tags = excluded.tags",
        [uid, tags.get("StudyInstanceUID", ""), tags.get("PatientID", ""),
         tags.get("PatientName", ""), tags.get("AccessionNumber", ""), tags.get("Modality", ""),
         tags.get("SeriesDescription", ""), tags.get("SenderAET", ""),
         tags.get("SenderAddress", ""), e.file_count, e.time, e.time, _json(tags)],
    )  # fmt: skip


def _job_created(db: Database, e: TaskEvent, state: str) -> None:
    task = e.extra.get("task") if isinstance(e.extra.get("task"), dict) else {}
    assert isinstance(task, dict)
    info = task.get("info") if isinstance(task.get("info"), dict) else {}
    assert isinstance(info, dict)
    parent = e.extra.get("parent_id") or task.get("parent_id") or ""
    created = float(task.get("created_at") or e.time)
    tags = e.tags
    db.execute(
        "INSERT INTO jobs (task_id, parent_id, series_uid, study_uid, patient_id, accession, "
        "action, rules, targets, state, instances, created, updated, routed_at, task, tags) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (task_id) DO NOTHING",
        [e.task_id, str(parent), e.series_uid or tags.get("SeriesInstanceUID", ""),
         tags.get("StudyInstanceUID", ""), tags.get("PatientID", ""),
         tags.get("AccessionNumber", ""), str(info.get("action", "")), e.rule, e.target, state,
         e.file_count, created, e.time, e.time, _json(task), _json(tags)],
    )  # fmt: skip


def _processing_run(db: Database, event_id: str, e: TaskEvent) -> None:
    x = e.extra
    code = x.get("exit_code")
    log_text = x.get("log")
    if isinstance(log_text, str) and len(log_text) > MAX_LOG_CHARS:
        log_text = "[start cut]\n" + log_text[-MAX_LOG_CHARS:]
    result = x.get("result", x.get("output"))
    outcome = "failed" if str(e.type) == "process_fail" or (code not in (None, 0)) else "done"
    duration = x.get("duration")
    db.execute(
        "INSERT INTO processing_runs (event_id, task_id, module, step, time, outcome, exit_code, "
        "duration, result, log) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [event_id, e.task_id, e.target, int(x.get("step") or 0), e.time, outcome,
         int(code) if isinstance(code, int) else None,
         float(duration) if isinstance(duration, int | float) else None,
         _json(result) if result is not None else None,
         log_text if isinstance(log_text, str) else None],
    )  # fmt: skip


RETENTION_TABLES: tuple[tuple[str, str], ...] = (
    ("events", "time"),
    ("dispatch_attempts", "time"),
    ("deliveries", "time"),
    ("processing_runs", "time"),
    ("notifications", "time"),
    ("jobs", "updated"),
    ("series", "last_seen"),
)


def apply_retention(db: Database, retention: float, now: float | None = None) -> int:
    """Delete what is older than ``retention`` seconds; returns the rows deleted."""
    if retention <= 0:
        return 0
    cutoff = (now or time.time()) - retention
    total = 0
    for table, column in RETENTION_TABLES:
        with db.transaction():
            before = int(db.scalar(f"SELECT COUNT(*) FROM {table} WHERE {column} < ?", [cutoff]))
            if before:
                db.execute(f"DELETE FROM {table} WHERE {column} < ?", [cutoff])
            total += before
    return total


__all__ = ["apply_record", "apply_retention", "service_of", "stored_cursor", "write_batch"]
