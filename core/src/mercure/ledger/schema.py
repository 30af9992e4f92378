"""The ledger's tables and their versioned migrations, run at start.

Each migration is a version number, a description and statements; ``schema_migrations``
records the versions applied. Migrations run in one transaction each, under a lock (SQLite's
write lock, a PostgreSQL advisory lock), so several router hosts starting at once against one
PostgreSQL apply each migration exactly once. A database newer than this version refuses to
start instead of being misread.

Tables (times are Unix seconds, JSON columns are text):

* ``events``: every record of the queue, in the order written (``seq``); ``event_id`` unique.
* ``series``: each received series with the tags mercure's bookkeeper stores.
* ``jobs``: each job, its parent job, rules, targets, last known state and task file.
* ``dispatch_attempts``: every try of a job at a target, with its result.
* ``deliveries``: every instance a target confirmed, with its SOP Instance UID and digest.
* ``processing_runs``: each module run: exit code, duration, result.json, log.
* ``notifications``: notifications sent or given up.
* ``ledger_cursors``: how far each spool's queue has been written into this database.
"""

from __future__ import annotations

from dataclasses import dataclass

from mercure.ledger.db import Database, LedgerUnavailable

ADVISORY_LOCK = 0x6D657263  # "merc"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events, series, jobs, attempts, deliveries, processing runs, notifications",
        (
            """CREATE TABLE events (
                seq {serial},
                event_id TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                type TEXT NOT NULL,
                time {float} NOT NULL,
                task_id TEXT NOT NULL DEFAULT '',
                series_uid TEXT NOT NULL DEFAULT '',
                target TEXT NOT NULL DEFAULT '',
                file_count INTEGER NOT NULL DEFAULT 0,
                info TEXT NOT NULL DEFAULT '',
                rule TEXT NOT NULL DEFAULT '',
                host TEXT NOT NULL DEFAULT '',
                service TEXT NOT NULL DEFAULT '',
                extra TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX events_task ON events (task_id, seq)",
            "CREATE INDEX events_time ON events (time)",
            "CREATE INDEX events_series ON events (series_uid)",
            """CREATE TABLE series (
                series_uid TEXT PRIMARY KEY,
                study_uid TEXT NOT NULL DEFAULT '',
                patient_id TEXT NOT NULL DEFAULT '',
                patient_name TEXT NOT NULL DEFAULT '',
                accession TEXT NOT NULL DEFAULT '',
                modality TEXT NOT NULL DEFAULT '',
                series_description TEXT NOT NULL DEFAULT '',
                sender_aet TEXT NOT NULL DEFAULT '',
                sender_address TEXT NOT NULL DEFAULT '',
                instances INTEGER NOT NULL DEFAULT 0,
                first_seen {float} NOT NULL,
                last_seen {float} NOT NULL,
                tags TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX series_patient ON series (patient_id)",
            "CREATE INDEX series_accession ON series (accession)",
            "CREATE INDEX series_study ON series (study_uid)",
            "CREATE INDEX series_last_seen ON series (last_seen)",
            """CREATE TABLE jobs (
                task_id TEXT PRIMARY KEY,
                parent_id TEXT NOT NULL DEFAULT '',
                series_uid TEXT NOT NULL DEFAULT '',
                study_uid TEXT NOT NULL DEFAULT '',
                patient_id TEXT NOT NULL DEFAULT '',
                accession TEXT NOT NULL DEFAULT '',
                action TEXT NOT NULL DEFAULT '',
                rules TEXT NOT NULL DEFAULT '',
                targets TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL DEFAULT '',
                error TEXT NOT NULL DEFAULT '',
                instances INTEGER NOT NULL DEFAULT 0,
                created {float} NOT NULL,
                updated {float} NOT NULL,
                routed_at {float} NOT NULL DEFAULT 0,
                task TEXT NOT NULL DEFAULT '{}',
                tags TEXT NOT NULL DEFAULT '{}'
            )""",
            "CREATE INDEX jobs_series ON jobs (series_uid)",
            "CREATE INDEX jobs_patient ON jobs (patient_id)",
            "CREATE INDEX jobs_accession ON jobs (accession)",
            "CREATE INDEX jobs_parent ON jobs (parent_id)",
            "CREATE INDEX jobs_updated ON jobs (updated)",
            """CREATE TABLE dispatch_attempts (
                id {serial},
                event_id TEXT NOT NULL,
                task_id TEXT NOT NULL,
                target TEXT NOT NULL,
                time {float} NOT NULL,
                delivered INTEGER NOT NULL DEFAULT 0,
                failed INTEGER NOT NULL DEFAULT 0,
                error TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX attempts_task ON dispatch_attempts (task_id)",
            "CREATE INDEX attempts_time ON dispatch_attempts (time)",
            """CREATE TABLE deliveries (
                id {serial},
                event_id TEXT NOT NULL,
                task_id TEXT NOT NULL,
                target TEXT NOT NULL,
                file TEXT NOT NULL,
                sop_instance_uid TEXT NOT NULL DEFAULT '',
                digest TEXT NOT NULL DEFAULT '',
                size {bigint} NOT NULL DEFAULT 0,
                time {float} NOT NULL
            )""",
            "CREATE INDEX deliveries_task ON deliveries (task_id)",
            "CREATE INDEX deliveries_sop ON deliveries (sop_instance_uid)",
            "CREATE INDEX deliveries_time ON deliveries (time)",
            """CREATE TABLE processing_runs (
                id {serial},
                event_id TEXT NOT NULL,
                task_id TEXT NOT NULL,
                module TEXT NOT NULL DEFAULT '',
                step INTEGER NOT NULL DEFAULT 0,
                time {float} NOT NULL,
                outcome TEXT NOT NULL DEFAULT '',
                exit_code INTEGER,
                duration {float},
                result TEXT,
                log TEXT
            )""",
            "CREATE INDEX runs_task ON processing_runs (task_id)",
            "CREATE INDEX runs_time ON processing_runs (time)",
            """CREATE TABLE notifications (
                id {serial},
                event_id TEXT NOT NULL,
                task_id TEXT NOT NULL,
                rule TEXT NOT NULL DEFAULT '',
                notifier TEXT NOT NULL DEFAULT '',
                outcome TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT '',
                tries INTEGER NOT NULL DEFAULT 0,
                time {float} NOT NULL
            )""",
            "CREATE INDEX notifications_task ON notifications (task_id)",
            "CREATE INDEX notifications_time ON notifications (time)",
            """CREATE TABLE ledger_cursors (
                queue_id TEXT PRIMARY KEY,
                segment {bigint} NOT NULL,
                position {bigint} NOT NULL,
                host TEXT NOT NULL DEFAULT '',
                updated {float} NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "indexes for paged job lists (state, time, study), attempts by target, services",
        (
            "CREATE INDEX jobs_state_created ON jobs (state, created)",
            "CREATE INDEX jobs_created ON jobs (created)",
            "CREATE INDEX jobs_study ON jobs (study_uid)",
            "CREATE INDEX attempts_target ON dispatch_attempts (target, time)",
            "CREATE INDEX events_kind ON events (kind, host, service, seq)",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version


class SchemaTooNew(LedgerUnavailable):
    """The database was migrated by a newer version of mercure."""


def current_version(db: Database) -> int:
    if not db.table_exists("schema_migrations"):
        return 0
    return int(db.scalar("SELECT MAX(version) FROM schema_migrations") or 0)


def migrate(db: Database) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied."""
    import time

    applied: list[int] = []
    with db.transaction():
        if db.backend == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", [ADVISORY_LOCK])
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {float} NOT NULL)"
        )
        version = current_version(db)
        if version > LATEST:
            raise SchemaTooNew(
                f"{db.describe()} has ledger schema version {version}, newer than this "
                f"mercure-core knows ({LATEST}): upgrade mercure-core on this host"
            )
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                [migration.version, migration.description, time.time()],
            )
            applied.append(migration.version)
    return applied


__all__ = ["LATEST", "MIGRATIONS", "Migration", "SchemaTooNew", "current_version", "migrate"]
