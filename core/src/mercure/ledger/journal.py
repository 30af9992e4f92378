"""What the pipeline writes events to: the ledger queue, without ever failing a job.

:meth:`Journal.record` appends durably and returns. If the spool cannot take the record now
(a full disk), the record is kept in memory, in order, and written before the next one; only
a process that dies while the disk stays full loses those (logged as an error).
"""

from __future__ import annotations

import threading
from collections import deque

from mercure.ledger.queue import EventQueue
from mercure.ledger.records import LedgerRecord
from mercure.logs import get_logger

log = get_logger("mercure.ledger")

MAX_BACKLOG = 100_000


class Journal:
    """Appends ledger records to the queue; never raises."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue
        self._backlog: deque[LedgerRecord] = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def record(self, record: LedgerRecord) -> None:
        if self._backlog:
            with self._lock:
                self._backlog.append(record)
                self._flush()
            return
        try:
            self.queue.append(record.to_json())
        except OSError as exc:
            with self._lock:
                if not self._backlog:
                    log.error(
                        "ledger queue cannot be written; events are kept in memory until it can",
                        folder=str(self.queue.folder),
                        error=str(exc),
                    )
                self._backlog.append(record)
                self._trim()
        except Exception as exc:  # a record that cannot be encoded: a bug, never a job's failure
            log.error("ledger record could not be queued", error=f"{exc.__class__.__name__}: {exc}")

    def _flush(self) -> None:
        while self._backlog:
            try:
                self.queue.append(self._backlog[0].to_json())
            except OSError:
                self._trim()
                return
            self._backlog.popleft()
        log.info("ledger queue writable again; the events kept in memory are written")

    def _trim(self) -> None:
        while len(self._backlog) > MAX_BACKLOG:
            self._backlog.popleft()
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        with self._lock:
            if self._backlog:
                self._flush()
            if self._backlog:
                log.error("ledger events lost: the queue could not be written before stopping",
                          count=len(self._backlog))  # fmt: skip
        self.queue.close()


__all__ = ["Journal"]
