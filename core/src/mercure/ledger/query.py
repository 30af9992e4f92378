"""Questions to the ledger, as a Python API: where did a study go, what happened to a job.

:class:`LedgerQueries` answers what ``mercure events``, ``mercure find`` and ``mercure job
show`` print, and what mercure's monitor module reads from its bookkeeper (tasks, task events,
series, task info, processing logs and results, find by term). Every method returns plain
dictionaries and lists, ready for JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mercure.ledger.db import Database

SERIES_COLUMNS = (
    "series_uid, study_uid, patient_id, patient_name, accession, modality, "
    "series_description, sender_aet, sender_address, instances, first_seen, last_seen"
)
JOB_COLUMNS = (
    "task_id, parent_id, series_uid, study_uid, patient_id, accession, action, rules, "
    "targets, state, error, instances, created, updated"
)


def _loads(value: Any, default: Any) -> Any:
    if not isinstance(value, str) or not value:
        return default
    try:
        return json.loads(value)
    except ValueError:
        return default


def _event(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["extra"] = _loads(row.get("extra"), {})
    return row


@dataclass
class JobHistory:
    """Everything the ledger knows about one job, each list in the order it happened."""

    job: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    processing: list[dict[str, Any]] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    related: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "series": self.series,
            "events": self.events,
            "attempts": self.attempts,
            "deliveries": self.deliveries,
            "processing": self.processing,
            "notifications": self.notifications,
            "related": self.related,
        }


class LedgerQueries:
    """Read-only questions over one ledger database connection."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- ids -----------------------------------------------------------------------------------

    def resolve(self, task_id: str) -> list[str]:
        """Job ids equal to ``task_id`` or starting with it (at most 10)."""
        exact = self.db.query("SELECT task_id FROM jobs WHERE task_id = ?", [task_id])
        if exact:
            return [task_id]
        rows = self.db.query(
            "SELECT task_id FROM jobs WHERE task_id LIKE ? ESCAPE '\\' ORDER BY task_id LIMIT 10",
            [_prefix(task_id)],
        )
        if rows:
            return [str(r["task_id"]) for r in rows]
        rows = self.db.query(
            "SELECT DISTINCT task_id FROM events WHERE task_id LIKE ? ESCAPE '\\' "
            "ORDER BY task_id LIMIT 10",
            [_prefix(task_id)],
        )
        return [str(r["task_id"]) for r in rows if r["task_id"]]

    # -- events ------------------------------------------------------------------------------

    def events(
        self,
        *,
        task_id: str | None = None,
        series_uid: str | None = None,
        types: list[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Events, newest last; ``limit`` keeps the newest ones."""
        where: list[str] = []
        params: list[Any] = []
        if task_id:
            where.append("task_id = ?")
            params.append(task_id)
        if series_uid:
            where.append("series_uid = ?")
            params.append(series_uid)
        if types:
            where.append(f"type IN ({', '.join('?' for _ in types)})")
            params.extend(types)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time <= ?")
            params.append(until)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(
            f"SELECT * FROM events {clause} ORDER BY seq DESC LIMIT ?", [*params, int(limit)]
        )
        return [_event(r) for r in reversed(rows)]

    # -- find ----------------------------------------------------------------------------------

    def find(
        self,
        *,
        patient_id: str | None = None,
        accession: str | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        task_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Jobs matching every given criterion, newest first, with their deliveries counted.

        ``sop_instance_uid`` finds the jobs that delivered that instance (or hold it under its
        usual file name ``<uid>.dcm``).
        """
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("j.patient_id", patient_id),
            ("j.accession", accession),
            ("j.study_uid", study_uid),
            ("j.series_uid", series_uid),
        ):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if task_id:
            where.append("j.task_id LIKE ? ESCAPE '\\'")
            params.append(_prefix(task_id))
        if sop_instance_uid:
            where.append(
                "j.task_id IN (SELECT task_id FROM deliveries WHERE sop_instance_uid = ? "
                "OR file = ?)"
            )
            params.extend([sop_instance_uid, f"{sop_instance_uid}.dcm"])
        if since is not None:
            where.append("j.updated >= ?")
            params.append(since)
        if until is not None:
            where.append("j.created <= ?")
            params.append(until)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        cols = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))
        rows = self.db.query(
            f"SELECT {cols}, s.patient_name, s.modality, s.series_description, "
            "(SELECT COUNT(*) FROM deliveries d WHERE d.task_id = j.task_id) AS delivered "
            f"FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid {clause} "
            "ORDER BY j.created DESC, j.task_id LIMIT ?",
            [*params, int(limit)],
        )
        return rows

    # -- one job -------------------------------------------------------------------------------

    def job(self, task_id: str) -> JobHistory | None:
        """The whole history of one job, or None if the ledger has nothing about it."""
        rows = self.db.query("SELECT * FROM jobs WHERE task_id = ?", [task_id])
        events = [
            _event(r)
            for r in self.db.query("SELECT * FROM events WHERE task_id = ? ORDER BY seq", [task_id])
        ]
        if not rows and not events:
            return None
        job = dict(rows[0]) if rows else {"task_id": task_id}
        job["task"] = _loads(job.get("task"), {})
        job["tags"] = _loads(job.get("tags"), {})
        history = JobHistory(job=job, events=events)
        history.attempts = self.db.query(
            "SELECT target, time, delivered, failed, error FROM dispatch_attempts "
            "WHERE task_id = ? ORDER BY time, id",
            [task_id],
        )
        history.deliveries = self.db.query(
            "SELECT target, file, sop_instance_uid, digest, size, time FROM deliveries "
            "WHERE task_id = ? ORDER BY time, id",
            [task_id],
        )
        history.processing = self.process_runs(task_id)
        history.notifications = self.db.query(
            "SELECT rule, notifier, outcome, detail, tries, time FROM notifications "
            "WHERE task_id = ? ORDER BY time, id",
            [task_id],
        )
        series_uid = job.get("series_uid")
        if series_uid:
            found = self.db.query(
                f"SELECT {SERIES_COLUMNS} FROM series WHERE series_uid = ?", [series_uid]
            )
            history.series = found[0] if found else None
            # The other jobs of the same routing (same series, same creation) and the parent
            # and children: where else the instances of this reception went.
            # One indexed lookup each (an OR over three columns would scan the table).
            history.related = self.db.query(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE task_id <> ? AND task_id IN ("
                "SELECT task_id FROM jobs WHERE series_uid = ? AND created = ? "
                "UNION SELECT task_id FROM jobs WHERE task_id = ? "
                "UNION SELECT task_id FROM jobs WHERE parent_id = ? AND parent_id <> '') "
                "ORDER BY created, task_id",
                [task_id, series_uid, job.get("created", -1), job.get("parent_id") or "-",
                 task_id],
            )  # fmt: skip
        return history

    # -- what mercure's monitor module reads from its bookkeeper ---------------------------------

    def series(self, series_uid: str = "") -> list[dict[str, Any]]:
        """Received series (one, or all), with the tags mercure's bookkeeper stores."""
        if series_uid:
            rows = self.db.query("SELECT * FROM series WHERE series_uid = ?", [series_uid])
        else:
            rows = self.db.query("SELECT * FROM series ORDER BY last_seen DESC LIMIT 1000")
        for row in rows:
            row["tags"] = _loads(row.get("tags"), {})
        return rows

    def tasks(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Jobs without a parent, with their series' description and modality."""
        return self.db.query(
            "SELECT j.task_id AS id, j.created AS time, j.action, j.state, j.targets, "
            "s.series_description AS tag_seriesdescription, s.modality AS tag_modality "
            "FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid "
            "WHERE j.parent_id = '' ORDER BY j.created DESC LIMIT ?",
            [int(limit)],
        )

    def task_events(self, task_id: str) -> list[dict[str, Any]]:
        """The events of a job and of its child jobs, by job and time."""
        rows = self.db.query(
            "SELECT * FROM events WHERE task_id = ? OR task_id IN "
            "(SELECT task_id FROM jobs WHERE parent_id = ? AND parent_id <> '') "
            "ORDER BY task_id = ? DESC, seq",
            [task_id, task_id, task_id],
        )
        return [_event(r) for r in rows]

    def task_info(self, task_id: str) -> dict[str, Any]:
        """The job's task file and its series' tags (mercure's ``get_task_info``)."""
        rows = self.db.query("SELECT task, tags, series_uid FROM jobs WHERE task_id = ?", [task_id])
        if not rows:
            return {}
        return {
            "task_id": task_id,
            "series_uid": rows[0]["series_uid"],
            "tags": _loads(rows[0]["tags"], {}),
            "task": _loads(rows[0]["task"], {}),
        }

    def process_runs(self, task_id: str) -> list[dict[str, Any]]:
        """Module runs of a job and its child jobs: exit code, duration, result, log."""
        rows = self.db.query(
            "SELECT task_id, module, step, time, outcome, exit_code, duration, result, log "
            "FROM processing_runs WHERE task_id = ? OR task_id IN "
            "(SELECT task_id FROM jobs WHERE parent_id = ? AND parent_id <> '') ORDER BY time, id",
            [task_id, task_id],
        )
        for row in rows:
            row["result"] = _loads(row.get("result"), None)
        return rows

    def process_logs(self, task_id: str) -> list[dict[str, Any]]:
        """mercure's ``task_process_logs``: one entry per run that left a log."""
        return [
            {
                "task_id": r["task_id"],
                "module_name": r["module"],
                "time": r["time"],
                "logs": r["log"],
            }
            for r in self.process_runs(task_id)
            if r.get("log") is not None
        ]

    def process_results(self, task_id: str) -> list[dict[str, Any]]:
        """mercure's ``task_process_results``: each run's result.json."""
        return [
            {
                "task_id": r["task_id"],
                "module": r["module"],
                "index": r["step"],
                "time": r["time"],
                "output": r["result"],
            }
            for r in self.process_runs(task_id)
            if r.get("result") is not None
        ]

    def find_task(self, term: str = "", limit: int = 512) -> dict[str, dict[str, Any]]:
        """mercure's ``find_task``: jobs whose accession or patient ID starts with ``term`` or
        whose patient name contains it (case-insensitive), newest first."""
        params: list[Any] = []
        clause = ""
        if term:
            clause = (
                "AND (lower(j.accession) LIKE ? ESCAPE '\\' "
                "OR lower(j.patient_id) LIKE ? ESCAPE '\\' "
                "OR lower(s.patient_name) LIKE ? ESCAPE '\\')"
            )
            low = _escape(term.lower())
            params = [f"{low}%", f"{low}%", f"%{low}%"]
        rows = self.db.query(
            "SELECT j.task_id, j.accession, j.patient_id, j.created, j.rules "
            "FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid "
            f"WHERE j.parent_id = '' {clause} ORDER BY j.created DESC, j.task_id DESC LIMIT ?",
            [*params, int(limit)],
        )
        return {
            str(r["task_id"]): {
                "ACC": r["accession"],
                "MRN": r["patient_id"],
                "Scope": "SERIES",
                "Time": r["created"],
                "Rule": r["rules"],
            }
            for r in rows
        }

    def state_counts(self) -> dict[str, int]:
        """Jobs per state (schema 3 keeps them by trigger: no count over the jobs)."""
        from mercure.ledger.schema import job_counts

        return job_counts(self.db)

    def counts(self) -> dict[str, int]:
        """Rows per table: for ``mercure ledger status``."""
        return {
            table: int(self.db.scalar(f"SELECT COUNT(*) FROM {table}") or 0)
            for table in (
                "events",
                "series",
                "jobs",
                "dispatch_attempts",
                "deliveries",
                "processing_runs",
                "notifications",
            )
        }


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _prefix(text: str) -> str:
    return f"{_escape(text)}%"


__all__ = ["JobHistory", "LedgerQueries"]
