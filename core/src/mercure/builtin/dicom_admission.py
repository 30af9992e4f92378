"""Admission of DICOM connections: hostile or broken peers cannot crowd out real senders.

pynetdicom starts an association (two threads) for every TCP connection it accepts and counts
it against the AE's association limit before the peer has said anything, so a few hundred idle
connections make every real association fail with "local limit exceeded". The receiver's
servers (:mod:`mercure.builtin.dicom_server`) put this gate between accept and pynetdicom:

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

Every refusal is logged with the source address (at most once per ten seconds for each reason
and address, with the number left out) and counted in :class:`ReceiverStats`.
"""

from __future__ import annotations

import contextlib
import fcntl
import selectors
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mercure.builtin import dicom_pdu
from mercure.builtin.dicom_pdu import MalformedPDU
from mercure.logs import get_logger

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
#: How long an association's idle timer may have run out before the watchdog cuts it off
#: (at most ``network_timeout``).
STALL_GRACE = 5.0
SWEEP_INTERVAL = 0.25
LOG_INTERVAL = 10.0

WAITING, HANDED, ADMITTED = "waiting", "handed", "admitted"


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


class _Server(Protocol):
    def hand_over(self, sock: socket.socket, peer: Any) -> None: ...


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Any
    address: str
    accepted: float
    address_listed: bool
    tls: bool
    state: str = WAITING
    handshaken: bool = False
    needed: int = dicom_pdu.HEADER_LENGTH  # bytes to peek before the next step
    lowat: int = 1
    decided: bool = False
    listed: bool = False
    calling_ae: str = ""
    assoc: Any = None
    idle_since: float | None = None
    cut_off: bool = False


def _available(sock: socket.socket) -> int:
    """Bytes in the socket's receive buffer (not counting TLS records already decrypted)."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])
    except (OSError, ValueError):
        return 0


def _shutdown(sock: socket.socket) -> None:
    """End the TCP connection under whoever uses it: its blocking reads and writes return."""
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, not TLS's


def _close(sock: socket.socket, last_words: bytes = b"") -> None:
    """Say ``last_words`` (an A-ABORT or A-ASSOCIATE-RJ) if possible, then close."""
    with contextlib.suppress(OSError, ValueError):
        if last_words:
            sock.setblocking(False)
            sock.send(last_words)
            socket.socket.shutdown(sock, socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


class Gate:
    """The waiting room of one listening port; see the module docstring."""

    def __init__(self, server: _Server, admission: Admission) -> None:
        self._server = server
        self._admission = admission
        self._settings = admission.settings
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._inbox: deque[tuple[socket.socket, Any, float]] = deque()
        self._lock = threading.Lock()
        self._pending: dict[str, list[_Connection]] = {}  # by address, oldest first
        self._pending_unlisted = 0
        self._admitted: list[_Connection] = []
        self._by_sock: dict[socket.socket, _Connection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-admission", daemon=True)

    # -- from other threads ------------------------------------------------------------------

    def start(self) -> None:
        self._admission.stats.add_gauges(self.gauges)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(10)
        self._admission.stats.remove_gauges(self.gauges)

    def gauges(self) -> dict[str, int]:
        """Connections waiting for their association request, and associations holding slots."""
        with self._lock:
            self._prune()
            pending = sum(len(c) for c in self._pending.values())
            return {"connections_pending": pending, "associations_active": len(self._admitted)}

    def submit(self, sock: socket.socket, peer: Any) -> None:
        """A connection just accepted (called by the accept loop)."""
        if len(self._inbox) > 4 * self._settings.max_pending_connections:
            # The gate cannot keep up: the accept loop must not queue without bound.
            self._admission.refuse("pending_total", str(peer[0]))
            _close(sock)
            return
        self._inbox.append((sock, peer, time.monotonic()))
        self._wake()

    def on_conn_open(self, event: Any) -> None:
        """pynetdicom made the association of a connection handed over."""
        with self._lock:
            conn = self._by_sock.get(event.assoc.dul.socket.socket)
            if conn is None:
                return
            conn.assoc = event.assoc
            if not conn.decided:  # its request is still to come: wait no longer than its deadline
                remaining = conn.accepted + self._settings.association_request_timeout
                event.assoc.acse_timeout = max(0.1, remaining - time.monotonic())

    def on_requested(self, event: Any) -> None:
        """pynetdicom decoded the A-ASSOCIATE-RQ of a connection handed over."""
        assoc = event.assoc
        with self._lock:
            conn = self._by_sock.get(assoc.dul.socket.socket)
            if conn is None or conn.decided:
                return
            assoc.acse_timeout = assoc.ae.acse_timeout
            conn.calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
            conn.listed = self._settings.sender_listed(conn.address, conn.calling_ae)
            reason = self._claim_slot(conn)
        if reason is not None:
            self._admission.refuse(reason, conn.address, calling_ae=conn.calling_ae)
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient: local limit exceeded
            assoc.kill()

    def abort(self, sock: socket.socket, reason: str, **fields: Any) -> None:
        """Abort an association for ``reason`` of :data:`REFUSALS` (called by its DUL thread).

        Sends an A-ABORT and ends the connection; pynetdicom's reader then sees it closed and
        ends the association. Only the first refusal of a connection is counted.
        """
        with self._lock:
            conn = self._by_sock.get(sock)
            if conn is not None:
                if conn.cut_off:
                    return
                conn.cut_off = True
        self._admission.refuse(reason, conn.address if conn else "?", **fields)
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(1.0)  # a peer that does not read gets no abort, only the close
            sock.sendall(dicom_pdu.abort_pdu(dicom_pdu.ABORT_INVALID_PARAMETER))
        _shutdown(sock)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the gate's thread -------------------------------------------------------------------

    def _run(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                for key, _ in self._selector.select(SWEEP_INTERVAL):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(65536)
                    else:
                        self._step(key.data)
                while self._inbox:
                    self._take(*self._inbox.popleft())
                now = time.monotonic()
                if now - last_sweep >= SWEEP_INTERVAL:
                    self._sweep(now)
                    last_sweep = now
            except Exception:  # the gate must outlive any one connection's surprise
                log.exception("DICOM admission gate error; it carries on")
                time.sleep(0.05)
        self._close_all()

    def _take(self, sock: socket.socket, peer: Any, accepted: float) -> None:
        self._admission.stats.count("connections_accepted")
        address = str(peer[0])
        conn = _Connection(
            sock,
            peer,
            address,
            accepted,
            self._settings.address_listed(address),
            isinstance(sock, ssl.SSLSocket),
        )
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if not self._make_room(conn):
                return
            self._pending.setdefault(address, []).append(conn)
            if not conn.address_listed:
                self._pending_unlisted += 1
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError):
            self._drop(conn)
            return
        if conn.tls:
            self._step(conn)  # start the handshake

    def _make_room(self, conn: _Connection) -> bool:
        """Close the connections a newcomer displaces; False if it must go instead (lock held)."""
        own = self._pending.get(conn.address, [])
        if len(own) >= self._settings.max_pending_per_address and not self._evict_one(
            own, "pending_per_address"
        ):
            self._admission.refuse("pending_per_address", conn.address)
            _close(conn.sock)
            return False
        if conn.address_listed or self._pending_unlisted < self._settings.max_pending_connections:
            return True
        lists = [c for c in self._pending.values() if c and not c[0].address_listed]
        for busiest in sorted(lists, key=lambda c: (-len(c), c[0].accepted)):
            if self._evict_one(busiest, "pending_total"):
                return True
        self._admission.refuse("pending_total", conn.address)
        _close(conn.sock)
        return False

    def _evict_one(self, conns: list[_Connection], reason: str) -> bool:
        """Close the oldest waiting connection of ``conns`` that sent nothing, else the oldest."""
        waiting = [c for c in conns if c.state == WAITING]
        if not waiting:
            return False  # all are in pynetdicom's hands until their deadline
        idle = [c for c in waiting if not c.tls and _available(c.sock) == 0]
        victim = (idle or waiting)[0]
        self._admission.refuse(reason, victim.address)
        self._forget(victim)
        self._unregister(victim)
        _close(victim.sock)
        return True

    def _step(self, conn: _Connection) -> None:
        """Move a waiting connection on as far as the bytes it sent allow."""
        if conn.state != WAITING:
            return
        if conn.tls and not conn.handshaken:
            self._handshake(conn)
            if not conn.handshaken:
                return
        if conn.tls:
            # Decrypted data cannot be read ahead: pynetdicom gets the connection when the
            # request starts to arrive, and it waits in the gate's counts until it came.
            if conn.sock.pending() or _available(conn.sock):  # type: ignore[attr-defined]
                self._hand_over(conn)
            return
        while True:
            try:
                data = conn.sock.recv(conn.needed, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                self._drop(conn)
                return
            if not data:
                self._drop(conn)  # closed by the peer before it asked for anything
                return
            if len(data) < conn.needed:
                if conn.lowat >= conn.needed:
                    self._drop(conn)  # woken with less than asked for: the peer closed
                elif not self._set_lowat(conn, conn.needed):
                    self._hand_over(conn)  # cannot wait for all of it: pynetdicom reads it
                return
            if conn.needed == dicom_pdu.HEADER_LENGTH:
                try:
                    conn.needed = dicom_pdu.check_first_header(data)
                except MalformedPDU as exc:
                    self._abort(conn, exc)
                    return
                continue
            break
        try:
            request = dicom_pdu.check_associate_rq(data)
        except MalformedPDU as exc:
            self._abort(conn, exc)
            return
        conn.calling_ae = request.calling_ae
        conn.listed = self._settings.sender_listed(conn.address, request.calling_ae)
        with self._lock:
            reason = self._claim_slot(conn)
        if reason is None:
            self._hand_over(conn)
            return
        self._admission.refuse(reason, conn.address, calling_ae=conn.calling_ae)
        self._unregister(conn)
        with contextlib.suppress(OSError):
            conn.sock.recv(conn.needed)  # consumed, so closing sends FIN (not RST) after the RJ
        _close(conn.sock, dicom_pdu.REJECT_LOCAL_LIMIT)

    def _handshake(self, conn: _Connection) -> None:
        sock: ssl.SSLSocket = conn.sock  # type: ignore[assignment]
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, conn)
            return
        except (OSError, ValueError) as exc:
            reason = str(exc.reason or exc) if isinstance(exc, ssl.SSLError) else str(exc)
            with self._lock:
                self._forget(conn)
            self._unregister(conn)
            self._admission.refuse("tls_handshake", conn.address, error=reason)
            _close(conn.sock)
            return
        conn.handshaken = True
        self._selector.modify(sock, selectors.EVENT_READ, conn)

    def _set_lowat(self, conn: _Connection, count: int) -> bool:
        """Have the selector wake only once ``count`` bytes arrived; False if not possible."""
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
            conn.lowat = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        except OSError:
            return False
        return conn.lowat >= count

    def _claim_slot(self, conn: _Connection) -> str | None:
        """Give ``conn`` an association slot, or say why not (lock held)."""
        self._prune()
        self._remove_pending(conn)
        conn.decided = True
        pool = sum(1 for c in self._admitted if c.listed == conn.listed)
        if pool >= self._settings.max_associations:
            return "association_limit"
        same = sum(1 for c in self._admitted if c.address == conn.address)
        if same >= self._settings.max_associations_per_address:
            return "association_limit_per_address"
        conn.state = ADMITTED
        self._admitted.append(conn)
        self._admission.stats.count("associations_admitted")
        return None

    def _hand_over(self, conn: _Connection) -> None:
        self._unregister(conn)
        with self._lock:
            if conn.state == WAITING:
                conn.state = HANDED
            self._by_sock[conn.sock] = conn
        try:
            if conn.lowat > 1:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            conn.sock.setblocking(True)
            self._server.hand_over(conn.sock, conn.peer)
        except Exception as exc:  # e.g. no thread can be started
            log.error(
                "cannot start an association for a connection; closed it",
                address=conn.address,
                error=repr(exc),
            )
            with self._lock:
                self._forget(conn)
            _close(conn.sock)

    def _abort(self, conn: _Connection, exc: MalformedPDU) -> None:
        with self._lock:
            self._forget(conn)
        self._unregister(conn)
        self._admission.refuse("malformed_request", conn.address, error=str(exc))
        with contextlib.suppress(OSError):
            conn.sock.recv(65536)  # what was read need not reset the connection before the abort
        _close(conn.sock, dicom_pdu.abort_pdu(exc.abort_reason))

    def _drop(self, conn: _Connection) -> None:
        with self._lock:
            self._forget(conn)
        self._unregister(conn)
        _close(conn.sock)

    def _unregister(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)

    def _remove_pending(self, conn: _Connection) -> None:
        conns = self._pending.get(conn.address)
        if conns is None or conn not in conns:
            return
        conns.remove(conn)
        if not conns:
            del self._pending[conn.address]
        if not conn.address_listed:
            self._pending_unlisted -= 1

    def _forget(self, conn: _Connection) -> None:
        """Remove ``conn`` from every count (lock held)."""
        self._remove_pending(conn)
        self._by_sock.pop(conn.sock, None)
        if conn in self._admitted:
            self._admitted.remove(conn)

    @staticmethod
    def _finished(conn: _Connection) -> bool:
        """Has pynetdicom finished with the connection? Clean up after a thread that died."""
        if conn.sock.fileno() == -1:
            return True
        assoc = conn.assoc
        if assoc is None or assoc.ident is None or assoc.is_alive():
            return False
        # The association's thread ended but left its connection open (it raised).
        with contextlib.suppress(Exception):
            assoc.dul.kill_dul()
        _shutdown(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        return True

    def _prune(self) -> None:
        """Forget connections pynetdicom is done with (lock held)."""
        for conn in [c for c in self._by_sock.values() if self._finished(c)]:
            self._forget(conn)

    def _sweep(self, now: float) -> None:
        """Deadlines of waiting connections and the stall watchdog."""
        timeout = self._settings.association_request_timeout
        with self._lock:
            self._prune()
            late = [
                c
                for conns in self._pending.values()
                for c in conns
                if now - c.accepted >= timeout and not c.cut_off
            ]
            stalled = []
            for conn in self._admitted:
                assoc = conn.assoc
                if conn.cut_off or assoc is None or not assoc.is_alive():
                    continue
                if not assoc.dul.idle_timer_expired():
                    conn.idle_since = None
                elif conn.idle_since is None:
                    conn.idle_since = now
                elif now - conn.idle_since >= min(STALL_GRACE, self._settings.network_timeout):
                    conn.cut_off = True
                    stalled.append(conn)
        for conn in late:
            self._admission.refuse("request_timeout", conn.address, seconds=timeout)
            if conn.state == WAITING:
                with self._lock:
                    self._forget(conn)
                self._unregister(conn)
                _close(conn.sock)
            else:  # in pynetdicom's hands: it ends the association, the prune forgets it
                conn.cut_off = True
                _shutdown(conn.sock)
        for conn in stalled:
            self._admission.refuse("stalled", conn.address, calling_ae=conn.calling_ae)
            _shutdown(conn.sock)

    def _close_all(self) -> None:
        with self._lock:
            waiting = [c for conns in self._pending.values() for c in conns if c.state == WAITING]
            for conn in waiting:
                self._forget(conn)
        for conn in waiting:
            self._unregister(conn)
            _close(conn.sock)
        while self._inbox:
            _close(self._inbox.popleft()[0])
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
