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
* ``job_counts`` (schema 3): jobs per state, kept by triggers on ``jobs`` so that counting
  costs the same with a thousand jobs as with millions. On PostgreSQL each connection adds to
  rows of its own (``shard``: its backend pid), so concurrent writers never wait on, or
  deadlock over, a shared counter row; :func:`compact_job_counts` folds them. The count of a
  state is the sum over its shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from mercure.ledger.db import Database, LedgerUnavailable

ADVISORY_LOCK = 0x6D657263  # "merc"


@dataclass(frozen=True)
class Migration:
    """Statements for both backends, then those of the database's own backend (triggers)."""

    version: int
    description: str
    statements: tuple[str, ...]
    sqlite: tuple[str, ...] = ()
    postgresql: tuple[str, ...] = ()

    def for_backend(self, backend: str) -> tuple[str, ...]:
        return self.statements + (self.postgresql if backend == "postgresql" else self.sqlite)


_PG_COUNT_FUNCTION = """CREATE FUNCTION mercure_job_counts() RETURNS trigger
LANGUAGE plpgsql AS $body$
DECLARE
    own INTEGER := pg_backend_pid();
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state IS NOT DISTINCT FROM NEW.state THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO job_counts (state, shard, n) VALUES (OLD.state, own, -1)
            ON CONFLICT (state, shard) DO UPDATE SET n = job_counts.n - 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO job_counts (state, shard, n) VALUES (NEW.state, own, 1)
            ON CONFLICT (state, shard) DO UPDATE SET n = job_counts.n + 1;
    END IF;
    RETURN NULL;
END
$body$"""


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
    Migration(
        3,
        "jobs per state kept by triggers; indexes for child jobs and targets' last results",
        (
            """CREATE TABLE job_counts (
                state TEXT NOT NULL,
                shard INTEGER NOT NULL DEFAULT 0,
                n {bigint} NOT NULL DEFAULT 0,
                PRIMARY KEY (state, shard)
            )""",
            # Most jobs have no parent: an index of the few that do answers "the children of
            # a job" without the planner weighing the one value every other row shares.
            "CREATE INDEX jobs_children ON jobs (parent_id) WHERE parent_id <> ''",
            "CREATE INDEX attempts_target_ok ON dispatch_attempts (target, time) WHERE failed = 0",
            "CREATE INDEX attempts_target_failed ON dispatch_attempts (target, time) "
            "WHERE failed > 0",
        ),
        sqlite=(
            """CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
                INSERT INTO job_counts (state, shard, n) VALUES (NEW.state, 0, 1)
                    ON CONFLICT (state, shard) DO UPDATE SET n = n + 1;
            END""",
            """CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
            WHEN OLD.state IS NOT NEW.state BEGIN
                INSERT INTO job_counts (state, shard, n) VALUES (NEW.state, 0, 1)
                    ON CONFLICT (state, shard) DO UPDATE SET n = n + 1;
                UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND shard = 0;
            END""",
            """CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
                UPDATE job_counts SET n = n - 1 WHERE state = OLD.state AND shard = 0;
            END""",
            "INSERT INTO job_counts (state, shard, n) SELECT state, 0, COUNT(*) FROM jobs "
            "GROUP BY state",
        ),
        postgresql=(
            _PG_COUNT_FUNCTION,
            "CREATE TRIGGER jobs_count AFTER INSERT OR UPDATE OF state OR DELETE ON jobs "
            "FOR EACH ROW EXECUTE FUNCTION mercure_job_counts()",
            # After the trigger exists (its creation waits for, then blocks, writers of jobs):
            # every job is counted once, by this or by the trigger.
            "INSERT INTO job_counts (state, shard, n) SELECT state, 0, COUNT(*) FROM jobs "
            "GROUP BY state",
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


def migrate(db: Database, upto: int = LATEST) -> list[int]:
    """Apply the migrations this database lacks (up to version ``upto``: tests build older
    schemas with it); returns the versions applied."""
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
            if migration.version <= version or migration.version > upto:
                continue
            for statement in migration.for_backend(db.backend):
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                [migration.version, migration.description, time.time()],
            )
            applied.append(migration.version)
    return applied


def job_counts(db: Database) -> dict[str, int]:
    """Jobs per state: from ``job_counts`` (a handful of rows) when the schema has it, else
    counted over ``jobs``."""
    if current_version(db) >= 3:
        rows = db.query("SELECT state, SUM(n) AS n FROM job_counts GROUP BY state")
    else:
        rows = db.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    return {str(r["state"]): int(r["n"] or 0) for r in rows if int(r["n"] or 0)}


def compact_job_counts(db: Database) -> None:
    """Fold the counters of every connection into one row per state (PostgreSQL's shards),
    under a lock that waits for the writers' transactions and holds the next ones briefly."""
    if current_version(db) < 3:
        return
    with db.transaction():
        if db.backend == "postgresql":
            db.execute("LOCK TABLE job_counts IN SHARE ROW EXCLUSIVE MODE")
        rows = db.query("SELECT state, SUM(n) AS n FROM job_counts GROUP BY state")
        db.execute("DELETE FROM job_counts")
        db.executemany(
            "INSERT INTO job_counts (state, shard, n) VALUES (?, 0, ?)",
            [[r["state"], int(r["n"] or 0)] for r in rows if int(r["n"] or 0)],
        )


__all__ = [
    "LATEST",
    "MIGRATIONS",
    "Migration",
    "SchemaTooNew",
    "compact_job_counts",
    "current_version",
    "job_counts",
    "migrate",
]
