"""Monitors: plugins that forward the ledger's records, in order, to an outside system.

A monitor (mercure's bookkeeper, an audit service, a message bus) registers a type with
``register_monitors(register)``; each instance configured under ``plugins.monitors`` (or, for
``bookkeeper``, by mercure's ``bookkeeper`` and ``bookkeeper_api_key`` fields) gets every
record of the ledger queue through :meth:`Monitor.send`, from the queue itself: a monitor
that is down delays its own records and loses none, and never delays a job.

Lifecycle and threads: the ``ledger`` service creates each instance once
(``Implementation(name, settings, context)``), calls :meth:`Monitor.start`, then
:meth:`Monitor.send` for one record at a time, in queue order, on a thread of the instance's
own, and :meth:`Monitor.close` at shutdown. Raise :class:`MonitorError` (or any exception) to
have the same record sent again after a backoff; :class:`PermanentMonitorError` to skip it
(logged). Delivery is at least once: a record sent just before a crash is sent again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from mercure.ledger.records import LedgerRecord, ServiceEvent
from mercure.lifecycle import Plugin, SettingsT


class MonitorError(Exception):
    """The record could not be forwarded now (peer down, 5xx): it is sent again later."""


class PermanentMonitorError(MonitorError):
    """The peer will never take this record (it rejected it): it is skipped."""


class Monitor(Plugin[SettingsT], ABC):
    """Forwards ledger records; see the module docstring for the lifecycle."""

    def wants(self, record: LedgerRecord) -> bool:
        """Whether this monitor forwards ``record`` (quick, no I/O); skipped ones cost nothing."""
        return True

    @abstractmethod
    def send(self, record: LedgerRecord) -> None:
        """Forward one record; return once the peer has it. Raise to be called again later."""


__all__ = ["LedgerRecord", "Monitor", "MonitorError", "PermanentMonitorError", "ServiceEvent"]
