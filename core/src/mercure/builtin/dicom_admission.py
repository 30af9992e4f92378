"""Admission of DICOM connections: hostile or broken peers cannot crowd out real senders.

pynetdicom starts an association (two threads) for every TCP connection it accepts and counts
it against the AE's association limit before the peer has said anything, so a few hundred idle
connections make every real association fail with "local limit exceeded". The receiver's
servers (:mod:`mercure.builtin.dicom_server`) put a gate (:mod:`mercure.builtin.dicom_gate`)
between accept and pynetdicom:

* A new connection waits in the gate (a socket in a selector, no thread) until its whole
  A-ASSOCIATE-RQ is in the kernel's receive buffer, read with ``MSG_PEEK`` (``SO_RCVLOWAT``
  wakes the gate only when it is complete) and checked by
  :func:`~mercure.builtin.dicom_pdu.check_associate_rq`; only then does pynetdicom get the
  connection, its bytes untouched. A TLS connection shakes hands in the gate first. A
  connection without a valid request within ``association_request_timeout`` is closed, a
  malformed one aborted: neither ever holds an association slot.
* Waiting connections are limited per source address and in total. At a limit the oldest
  waiting connection that has sent nothing is closed to make room: a flood only displaces
  itself, and a sender that connects and asks at once gets in.
* Association slots are counted here: ``max_associations`` in total and
  ``max_associations_per_address``; beyond them a request is rejected (transient, "local limit
  exceeded") before any thread starts. Senders on the allow-lists have slots of their own,
  which senders not on them never take.
* A watchdog cuts off associations whose peer stopped in the middle of a PDU: pynetdicom reads
  a PDU with a blocking ``recv``, so its own network timeout never frees such a slot.

This module holds what the gates of one receiver share: the limits (:class:`AdmissionSettings`),
the counters (:class:`ReceiverStats`) and the refusal log (:class:`Admission`). Every refusal
is logged with the source address (at most once per ten seconds for each reason and address,
with the number left out) and counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mercure.logs import get_logger
from mercure.metrics import Metric

if TYPE_CHECKING:
    from mercure.config import DicomReceiverConfig

log = get_logger("mercure.receiver")

#: What a refusal's log line says, by the reason that is also its counter's name.
REFUSALS = {
    "pending_per_address": "refused connection: too many connections from this address "
    "without an association request; closed one",
    "pending_total": "refused connection: too many connections without an association "
    "request; closed one from the busiest address",
    "request_timeout": "refused connection: no association request in time",
    "malformed_request": "refused connection: its first PDU is not a valid association request",
    "tls_handshake": "refused connection: TLS handshake failed",
    "association_limit": "refused association: every association slot is taken",
    "association_limit_per_address": "refused association: this address holds all the "
    "association slots one address may have",
    "pdu_too_large": "refused association: PDU longer than the receiver accepts; aborted",
    "malformed_message": "refused association: a DIMSE message cannot be decoded; aborted",
    "protocol_error": "refused association: a PDU came when the protocol does not allow it; "
    "aborted",
    "stalled": "refused association: the peer stopped in the middle of a PDU; cut off",
}

#: With ``max_pdu`` 0 ("no limit") a PDU may still not be longer than this.
UNLIMITED_PDU_CEILING = 1 << 30
#: Slack over ``max_pdu`` for senders that count the PDU header into the maximum.
PDU_SLACK = 64
LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class AdmissionSettings:
    """The admission limits of one receiver (from ``dicom_receiver``)."""

    association_request_timeout: float = 10.0
    max_pending_connections: int = 128
    max_pending_per_address: int = 16
    max_associations: int = 64
    max_associations_per_address: int = 32
    network_timeout: float = 60.0
    max_pdu: int = 0
    allowed_addresses: frozenset[str] = frozenset()
    allowed_calling_aets: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg: DicomReceiverConfig) -> AdmissionSettings:
        return cls(
            association_request_timeout=cfg.association_request_timeout,
            max_pending_connections=cfg.max_pending_connections,
            max_pending_per_address=cfg.max_pending_per_address,
            max_associations=cfg.max_associations,
            max_associations_per_address=cfg.max_associations_per_address,
            network_timeout=cfg.network_timeout,
            max_pdu=cfg.max_pdu,
            allowed_addresses=frozenset(cfg.allowed_addresses),
            allowed_calling_aets=frozenset(a.strip() for a in cfg.allowed_calling_aets),
        )

    @property
    def pdu_limit(self) -> int:
        """The longest PDU (its length field) read from a peer once associated."""
        return self.max_pdu + PDU_SLACK if self.max_pdu > 0 else UNLIMITED_PDU_CEILING

    def address_listed(self, address: str) -> bool:
        """Known by its address alone (only when ``allowed_addresses`` is configured)."""
        return bool(self.allowed_addresses) and address in self.allowed_addresses

    def sender_listed(self, address: str, calling_ae: str) -> bool:
        """On every allow-list that is configured (and at least one is)."""
        if not (self.allowed_addresses or self.allowed_calling_aets):
            return False
        if self.allowed_addresses and address not in self.allowed_addresses:
            return False
        return not self.allowed_calling_aets or calling_ae in self.allowed_calling_aets


class ReceiverStats:
    """Counters of the receiver's connection handling, shared by its ports.

    :meth:`snapshot` gives ``connections_accepted``, ``associations_admitted``, one
    ``refused_<reason>`` per reason of :data:`REFUSALS`, ``refused_total``, and the gauges
    ``connections_pending`` and ``associations_active``. Counts are per receiver process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"connections_accepted": 0, "associations_admitted": 0}
        self._counts.update({f"refused_{reason}": 0 for reason in REFUSALS})
        self._gauges: list[Callable[[], dict[str, int]]] = []

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def add_gauges(self, source: Callable[[], dict[str, int]]) -> None:
        """``source`` tells the current values of gauges (a port's gate)."""
        with self._lock:
            self._gauges.append(source)

    def remove_gauges(self, source: Callable[[], dict[str, int]]) -> None:
        with self._lock:
            if source in self._gauges:
                self._gauges.remove(source)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            values = dict(self._counts)
            sources = list(self._gauges)
        values["refused_total"] = sum(v for k, v in values.items() if k.startswith("refused_"))
        values["connections_pending"] = values["associations_active"] = 0
        for source in sources:
            for name, value in source().items():
                values[name] += value
        return values


class Admission:
    """One receiver's settings, counters and refusal log, shared by the gates of its ports."""

    def __init__(self, settings: AdmissionSettings, stats: ReceiverStats | None = None) -> None:
        self.settings = settings
        self.stats = stats or ReceiverStats()
        self._lock = threading.Lock()
        self._logged: dict[tuple[str, str], list[float]] = {}  # key -> [time, left out]

    def refuse(self, reason: str, address: str, **fields: Any) -> None:
        """Count a refusal and log it, at most once per LOG_INTERVAL for each reason and address."""
        self.stats.count(f"refused_{reason}")
        now = time.monotonic()
        key = (reason, address)
        with self._lock:
            entry = self._logged.get(key)
            if entry is not None and now - entry[0] < LOG_INTERVAL:
                entry[1] += 1
                return
            left_out = int(entry[1]) if entry is not None else 0
            if len(self._logged) >= 4096:
                self._logged = {k: v for k, v in self._logged.items() if now - v[0] < LOG_INTERVAL}
            self._logged[key] = [now, 0]
        if left_out:
            fields["not_logged_since_last"] = left_out
        log.warning(REFUSALS[reason], address=address, reason=reason, **fields)


class StatsMetrics:
    """The receiver's counters as metrics for the metrics hub's periodic gauges.

    Counters go out as increments since the previous call (``receiver.refused`` with the
    reason as a tag), the pending connections and active associations as gauges.
    """

    GAUGES = ("connections_pending", "associations_active")

    def __init__(self, stats: ReceiverStats) -> None:
        self.stats = stats
        self._last: dict[str, int] = {}

    def __call__(self) -> list[Metric]:
        now = self.stats.snapshot()
        found: list[Metric] = []
        for name, value in now.items():
            if name in self.GAUGES:
                found.append(Metric(f"receiver.{name}", value, kind="gauge", service="receiver"))
                continue
            delta = value - self._last.get(name, 0)
            if delta <= 0 or name == "refused_total":
                continue
            if name.startswith("refused_"):
                tags = {"reason": name.removeprefix("refused_")}
                found.append(Metric("receiver.refused", delta, tags, service="receiver"))
            else:
                found.append(Metric(f"receiver.{name}", delta, service="receiver"))
        self._last = now
        return found
