"""The delivery ledger: where every instance went, when, to which targets, with what result.

The pipeline's events (:class:`mercure.events.TaskEvent`) go into a durable queue on the spool
(:mod:`mercure.ledger.queue`) as they happen; the ``ledger`` service drains the queue, in
order, into SQLite (the default, under the ledger folder) or PostgreSQL
(:mod:`mercure.ledger.writer`), and feeds the configured monitor plugins from the same queue.
A database that is down or locked delays the history, never the images, and loses nothing.
:mod:`mercure.ledger.query` answers questions; :mod:`mercure.ledger.replay` replays changed
rules on the recorded series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mercure.config import Config
from mercure.ledger.db import Database, LedgerConfigError, LedgerUnavailable
from mercure.ledger.query import JobHistory, LedgerQueries
from mercure.ledger.queue import EventQueue
from mercure.ledger.records import LedgerRecord, ServiceEvent

OFF = "off"
SQLITE_NAME = "ledger.sqlite3"


@dataclass(frozen=True)
class LedgerSettings:
    """The ledger settings of a configuration, with defaults resolved."""

    folder: Path
    database: str
    retention: int
    digests: bool

    @classmethod
    def of(cls, config: Config) -> LedgerSettings:
        folder = (
            Path(config.ledger_folder)
            if config.ledger_folder
            else config.folder("outgoing").parent / "ledger"
        )
        return cls(
            folder=folder,
            database=(config.ledger_database or "").strip(),
            retention=config.ledger_retention,
            digests=config.ledger_digests,
        )

    @property
    def queue_folder(self) -> Path:
        return self.folder / "queue"

    @property
    def enabled(self) -> bool:
        """Whether a database is written (the queue may still feed monitors when it is not)."""
        return self.database.lower() != OFF

    def database_handle(self, *, read_only: bool = False) -> Database:
        if not self.enabled:
            raise LedgerConfigError("the ledger is switched off (ledger_database is 'off')")
        return Database.from_url(self.database, self.folder / SQLITE_NAME, read_only=read_only)


def open_queries(config: Config) -> LedgerQueries:
    """Read-only queries over the configuration's ledger; ``LedgerUnavailable`` if it is not
    there (yet) or cannot be reached."""
    db = LedgerSettings.of(config).database_handle(read_only=True)
    db.connect()
    return LedgerQueries(db)


__all__ = [
    "Database",
    "EventQueue",
    "JobHistory",
    "LedgerConfigError",
    "LedgerQueries",
    "LedgerRecord",
    "LedgerSettings",
    "LedgerUnavailable",
    "ServiceEvent",
    "open_queries",
]
