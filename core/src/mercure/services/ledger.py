"""The ``ledger`` service: drains the ledger queue into the database and feeds the monitors.

The database writer reads the queue from the cursor the database keeps for this spool's queue
and writes batches of records with their cursor in one transaction (in order, each once).
While the database is down, locked or full it waits with a growing delay (up to a minute) and
logs that once a few minutes; the queue keeps every record meanwhile. Migrations run when the
database is first reached. Each monitor instance reads the same queue on a thread of its own
with a cursor of its own. Segments every reader has passed are deleted; history older than
``ledger_retention`` is deleted from the database once an hour.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from mercure.ledger import LedgerSettings
from mercure.ledger.db import Database, LedgerUnavailable, parse_url
from mercure.ledger.queue import EventQueue, Position
from mercure.ledger.records import LedgerRecord
from mercure.ledger.schema import compact_job_counts, migrate
from mercure.ledger.writer import apply_retention, stored_cursor, write_batch
from mercure.logs import get_logger
from mercure.monitors import Monitor, PermanentMonitorError
from mercure.services.base import Service
from mercure.services.runtime import Runtime

BATCH = 500
RETRY_START = 1.0
RETRY_CAP = 60.0
WARN_EVERY = 300.0
TRIM_EVERY = 10.0
RETENTION_EVERY = 3600.0
DB_READER = "ledger"


def check_ledger_settings(runtime: Runtime) -> None:
    """Fail at start, with what to do, for a ledger setting that can never work."""
    settings = LedgerSettings.of(runtime.config)
    if not settings.enabled:
        return
    backend, _ = parse_url(settings.database, settings.folder / "ledger.sqlite3")
    if backend == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ValueError(
                "ledger_database is a PostgreSQL URL, but the psycopg driver is not installed: "
                "pip install 'mercure-core[postgres]'"
            ) from None


class LedgerService(Service):
    """Writes the ledger; see the module docstring."""

    name = "ledger"

    def __init__(self, runtime: Runtime, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.runtime = runtime
        self.settings = LedgerSettings.of(runtime.config)
        self.queue = EventQueue(self.settings.queue_folder, fsync=runtime.fsync)
        self.db: Database | None = (
            self.settings.database_handle() if self.settings.enabled else None
        )
        self.position: Position | None = None
        self.migrated = False
        self.retry_delay = RETRY_START
        self.retry_at = 0.0
        self.last_warning = 0.0
        self.outage_since: float | None = None
        self.next_trim = 0.0
        self.next_retention = 0.0
        self.feeds: list[MonitorFeed] = []
        self.written = 0

    def readers(self) -> list[str]:
        names = [DB_READER] if self.db is not None else []
        return names + [feed.reader for feed in self.feeds]

    def start(self) -> None:
        for inst in self.runtime.config.plugin_instances("monitor"):
            impl = self.runtime.plugins.registry.get("monitor", inst.type_name).implementation
            monitor: Monitor[Any] = impl(
                inst.name, inst.settings, self.runtime.context("monitor", inst.name)
            )
            self.feeds.append(MonitorFeed(self.queue, inst.name, monitor, self.runtime.fsync))
        wanted = set(self.readers())
        for reader in self.queue.readers():
            if reader not in wanted:
                self.log.warning(
                    "ledger queue reader is not configured any more; its position is dropped",
                    reader=reader,
                )
                self.queue.drop_reader(reader)
        for reader in wanted:
            if self.queue.cursor(reader) is None:
                self.queue.save_cursor(reader, self.queue.start())
        for feed in self.feeds:
            feed.start()
        super().start()

    # -- the database --------------------------------------------------------------------------

    def run_once(self) -> int:
        now = time.time()
        handled = 0
        if self.db is not None and now >= self.retry_at:
            try:
                handled = self._drain(self.db)
            except LedgerUnavailable as exc:
                self._unavailable(exc)
                handled = 0
        if now >= self.next_trim:
            self.next_trim = now + TRIM_EVERY
            try:
                self.queue.trim(self.readers())
            except OSError as exc:
                self.log.warning("ledger queue segments could not be deleted", error=str(exc))
        return handled

    def _connect(self, db: Database) -> Position:
        if not self.migrated:
            applied = migrate(db)
            self.migrated = True
            if applied:
                self.log.info("ledger schema migrated", database=db.describe(), versions=applied)
        stored = stored_cursor(db, self.queue.queue_id)
        return stored if stored is not None else self.queue.start()

    def _drain(self, db: Database) -> int:
        if self.position is None:
            self.position = self._connect(db)
        records, after = self.queue.read(self.position, BATCH)
        if not records and after == self.position:
            self._maybe_retention(db)
            return 0
        end = write_batch(db, self.queue.queue_id, self.position, records, after)
        if end is None:
            self.log.warning("ledger cursor moved by another writer; reading from its position")
            self.position = None
            return 0
        self.position = end
        self.queue.save_cursor(DB_READER, end)
        self.written += len(records)
        if self.outage_since is not None:
            self.log.info(
                "ledger database reachable again; the queued history is being written",
                database=db.describe(),
                after_seconds=round(time.time() - self.outage_since, 1),
            )
            self.outage_since = None
        self.retry_delay = RETRY_START
        return len(records)

    def _unavailable(self, exc: Exception) -> None:
        now = time.time()
        if self.outage_since is None:
            self.outage_since = now
        self.position = None  # read the cursor again once it is back
        if now - self.last_warning >= WARN_EVERY:
            self.last_warning = now
            self.log.warning(
                "ledger database unavailable; history waits in the queue (nothing is lost)",
                error=str(exc),
                retry_in=round(self.retry_delay, 1),
            )
        self.retry_at = now + self.retry_delay
        self.retry_delay = min(RETRY_CAP, self.retry_delay * 2)

    def _maybe_retention(self, db: Database) -> None:
        now = time.time()
        if now < self.next_retention:
            return
        self.next_retention = now + RETENTION_EVERY
        removed = apply_retention(db, self.settings.retention, now)
        if db.backend == "postgresql":
            compact_job_counts(db)  # one row per state again, whatever connections came and went
        if removed:
            self.log.info(
                "old ledger history deleted", rows=removed, older_than_s=self.settings.retention
            )

    def close(self) -> None:
        for feed in self.feeds:
            feed.stop()
        if self.db is not None:
            # Write what the other services queued while stopping (they stopped first).
            deadline = time.monotonic() + 5.0
            try:
                while time.monotonic() < deadline and self._drain(self.db):
                    pass
            except LedgerUnavailable:
                pass  # written at the next start
            self.db.close()
        self.queue.close()


class MonitorFeed:
    """One monitor instance reading the queue with its own cursor, on its own thread."""

    def __init__(self, queue: EventQueue, name: str, monitor: Monitor[Any], fsync: bool) -> None:
        self.queue = queue
        self.name = name
        self.reader = f"monitor-{name}"
        self.monitor = monitor
        self.fsync = fsync
        self.stop_event = threading.Event()
        self.draining = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"monitor-{name}", daemon=True)
        self.log = get_logger("mercure.ledger").bind(monitor=name)
        self.sent = 0
        self.skipped = 0
        self.started = False

    def start(self) -> None:
        self.thread.start()

    def stop(self, drain: float = 5.0, timeout: float = 30.0) -> None:
        """Forward what is queued (up to ``drain`` seconds, e.g. the SHUTDOWN events), stop."""
        self.draining.set()
        if self.thread.is_alive():
            self.thread.join(drain)
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.started:
            try:
                self.monitor.close()
            except Exception as exc:
                self.log.warning("closing monitor failed", error=str(exc))

    def _run(self) -> None:
        delay = RETRY_START
        while not self.stop_event.is_set():
            if not self.started:
                try:
                    self.monitor.start()
                    self.started = True
                except Exception as exc:
                    self.log.error("monitor did not start; trying again", error=str(exc))
                    self.stop_event.wait(delay)
                    delay = min(RETRY_CAP, delay * 2)
                    continue
            position = self.queue.cursor(self.reader) or self.queue.start()
            try:
                records, after = self.queue.read(position, 100)
            except (OSError, ValueError) as exc:
                self.log.error("ledger queue cannot be read", error=str(exc))
                self.stop_event.wait(RETRY_CAP)
                continue
            if not records:
                if after != position:
                    self.queue.save_cursor(self.reader, after)
                if self.draining.is_set():
                    return
                self.stop_event.wait(0.2)
                continue
            for item in records:
                if not self._deliver(item.data):
                    break  # stopping
                self.queue.save_cursor(self.reader, item.end)
            else:
                if after != records[-1].end:
                    self.queue.save_cursor(self.reader, after)

    def _deliver(self, data: dict[str, Any]) -> bool:
        """Send one record until it is taken (or skipped); False if stopping first."""
        try:
            record = LedgerRecord.from_json(data)
        except ValueError as exc:
            self.log.warning("ledger record unreadable; not forwarded", error=str(exc))
            return True
        delay = RETRY_START
        failures = 0
        while not self.stop_event.is_set():
            try:
                if self.monitor.wants(record):
                    self.monitor.send(record)
                    self.sent += 1
                if failures:
                    self.log.info("monitor reachable again", after_failures=failures)
                return True
            except PermanentMonitorError as exc:
                self.skipped += 1
                self.log.error(
                    "monitor refused a record; skipped", record=record.id, error=str(exc)
                )
                return True
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    self.log.warning(
                        "monitor failed; the record is sent again later (nothing is lost)",
                        error=f"{exc.__class__.__name__}: {exc}",
                        failures=failures,
                    )
                self.stop_event.wait(delay)
                delay = min(RETRY_CAP, delay * 2)
        return False


__all__ = ["LedgerService", "MonitorFeed", "check_ledger_settings"]
