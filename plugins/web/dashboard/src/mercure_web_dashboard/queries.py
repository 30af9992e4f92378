"""The dashboard's questions to the ledger, on top of :class:`mercure.ledger.LedgerQueries`.

Job lists are paged by a key (``created``, ``task_id``) rather than an offset, so the
hundredth page costs what the first does; counts, the throughput plot and each target's last
success and failure are aggregates over indexed columns (ledger schema version 2). Everything
is read-only and works on SQLite and PostgreSQL alike.

A connection is opened per request on SQLite (cheap, and it sees the writer's latest
transactions even when the ledger service restarted) and kept per thread on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mercure.config import Config
from mercure.ledger import LedgerQueries, LedgerSettings, LedgerUnavailable
from mercure.ledger.query import JOB_COLUMNS

JOB_STATES = ("outgoing", "processing", "success", "error", "discard")
RECEIVING_TYPES = ("route", "process", "discard", "notification")
HOST = socket.gethostname()


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    next_cursor: str | None


def _prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}%"


def _cursor(row: dict[str, Any]) -> str:
    return f"{float(row['created']):.6f}:{row['task_id']}"


def _parse_cursor(cursor: str | None) -> tuple[float, str] | None:
    if not cursor:
        return None
    created, _, task_id = cursor.partition(":")
    try:
        return float(created), task_id
    except ValueError:
        return None


class Ledger:
    """Opens read-only ledger connections for the request threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = LedgerSettings.of(config)
        self._local = threading.local()

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @contextlib.contextmanager
    def open(self) -> Iterator[DashboardQueries]:
        """Queries for one request; ``LedgerUnavailable`` (or ``LedgerConfigError``) if the
        ledger cannot be read now."""
        db = self.settings.database_handle(read_only=True)
        if db.backend == "postgresql":
            cached = getattr(self._local, "queries", None)
            if cached is None:
                db.connect()
                cached = DashboardQueries(db)
                self._local.queries = cached
            try:
                yield cached
            except LedgerUnavailable:
                cached.db.close()
                self._local.queries = None
                raise
            return
        db.connect()
        try:
            yield DashboardQueries(db)
        finally:
            db.close()


class DashboardQueries(LedgerQueries):
    """The ledger's queries plus the dashboard's paged lists and aggregates."""

    def state_counts(self) -> dict[str, int]:
        """Every state's count, the known ones first (zero included)."""
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(super().state_counts())
        return counts

    def jobs_page(
        self,
        *,
        state: str | None = None,
        target: str | None = None,
        task_prefix: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """One page of jobs, newest first; ``cursor`` continues after the previous page."""
        where: list[str] = []
        params: list[Any] = []
        if state:
            where.append("j.state = ?")
            params.append(state)
        if target:
            where.append("(j.targets = ? OR j.targets LIKE ? ESCAPE '\\')")
            params.extend([target, f"%{target.replace('%', '').replace('_', '')}%"])
        if task_prefix:
            where.append("j.task_id LIKE ? ESCAPE '\\'")
            params.append(_prefix(task_prefix))
        after = _parse_cursor(cursor)
        if after is not None:
            # "created <= ?" is the index range (the OR alone would be a filter over every
            # newer job: the hundredth page would read 5,000 rows to skip them).
            where.append("j.created <= ? AND (j.created < ? OR j.task_id < ?)")
            params.extend([after[0], after[0], after[1]])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        cols = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))
        rows = self.db.query(
            f"SELECT {cols}, s.patient_name, s.modality, s.series_description "
            f"FROM jobs j LEFT JOIN series s ON s.series_uid = j.series_uid {clause} "
            "ORDER BY j.created DESC, j.task_id DESC LIMIT ?",
            [*params, int(limit) + 1],
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, _cursor(rows[-1]) if more and rows else None)

    def _bucket(self, column: str, seconds: int) -> str:
        if self.db.backend == "postgresql":
            return f"FLOOR({column} / {seconds})"
        return f"CAST({column} / {seconds} AS INTEGER)"

    def throughput(self, since: float, bucket: int = 60) -> dict[str, dict[int, int]]:
        """Instances received (once per reception, however many targets) and delivered (per
        target) in each ``bucket`` seconds since ``since``: bucket start -> count.

        Grouped by ``created`` first, so that the planner walks ``jobs_created`` from
        ``since`` (grouped by series first it may read the whole series index instead)."""
        b = self._bucket("created", bucket)
        received = self.db.query(
            f"SELECT {b} AS m, SUM(n) AS n FROM (SELECT created, MAX(instances) AS n FROM jobs "
            "WHERE created >= ? AND parent_id = '' GROUP BY created, series_uid) r GROUP BY m",
            [since],
        )
        b = self._bucket("time", bucket)
        delivered = self.db.query(
            f"SELECT {b} AS m, SUM(file_count) AS n FROM events "
            "WHERE time >= ? AND type = 'dispatch' GROUP BY m",
            [since],
        )
        return {
            "received": {int(r["m"]) * bucket: int(r["n"] or 0) for r in received},
            "delivered": {int(r["m"]) * bucket: int(r["n"] or 0) for r in delivered},
        }

    def target_summary(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Each target's last successful and last failed attempt (time, error)."""
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            # Each the first entry of a partial index (schema 3): constant time even for a
            # target that never failed or never succeeded.
            ok = self.db.query(
                "SELECT time FROM dispatch_attempts WHERE target = ? AND failed = 0 "
                "ORDER BY time DESC LIMIT 1",
                [name],
            )
            bad = self.db.query(
                "SELECT time, error FROM dispatch_attempts WHERE target = ? AND failed > 0 "
                "ORDER BY time DESC LIMIT 1",
                [name],
            )
            out[name] = {
                "last_success": ok[0]["time"] if ok else None,
                "last_failure": bad[0]["time"] if bad else None,
                "last_error": bad[0]["error"] if bad else "",
            }
        return out

    def services(self) -> list[dict[str, Any]]:
        """The last start or stop of each service on each host, and whether it still runs
        (checked by process id for the services of this host)."""
        rows = self.db.query(
            "SELECT e.host, e.service, e.type, e.time, e.info, e.extra FROM events e "
            "JOIN (SELECT host, service, MAX(seq) AS seq FROM events WHERE kind = 'service' "
            "GROUP BY host, service) last ON last.seq = e.seq ORDER BY e.service, e.host"
        )
        found = []
        for r in rows:
            extra = _json(r.get("extra"))
            pid = extra.get("pid")
            state = "running" if r["type"] == "BOOT" else "stopped"
            local = r["host"] == HOST and isinstance(pid, int)
            if state == "running" and local and not _alive(int(pid or 0)):
                state = "gone (its process ended without a shutdown)"
            found.append({**r, "state": state, "pid": pid})
        return found


def _json(value: Any) -> dict[str, Any]:
    import json

    try:
        data = json.loads(value) if isinstance(value, str) else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["JOB_STATES", "DashboardQueries", "Ledger", "Page"]
