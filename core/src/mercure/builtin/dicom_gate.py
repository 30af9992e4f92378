"""The admission gate of one listening port: where connections wait before pynetdicom sees them.

A connection accepted by :class:`~mercure.builtin.dicom_server.GuardedServer` is handed to
:meth:`Gate.submit`. The gate's thread keeps it in a selector (no thread of its own) and moves
it on as bytes arrive: a TLS handshake first (non-blocking), then the 6-byte PDU header, then
the whole A-ASSOCIATE-RQ, peeked with ``MSG_PEEK`` and ``SO_RCVLOWAT`` so that pynetdicom later
reads it untouched. A valid request gets an association slot (or an A-ASSOCIATE-RJ) and the
connection goes to pynetdicom (:meth:`GuardedServer.hand_over`); anything else is aborted or
closed. Every quarter second the gate closes connections past their deadline and cuts off
associations whose peer stopped inside a PDU. pynetdicom's events tell it when a handed-over
connection asked for its association (TLS: decided then) and :meth:`Gate.abort` is how the
patched reader refuses a PDU. See :mod:`mercure.builtin.dicom_admission` for the policy.
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
from dataclasses import dataclass
from typing import Any, Protocol

from mercure.builtin import dicom_pdu
from mercure.builtin.dicom_admission import Admission
from mercure.builtin.dicom_pdu import MalformedPDU
from mercure.logs import get_logger

log = get_logger("mercure.receiver")

#: How long an association's idle timer may have run out before the watchdog cuts it off
#: (at most ``network_timeout``).
STALL_GRACE = 5.0
SWEEP_INTERVAL = 0.25

WAITING, HANDED, ADMITTED = "waiting", "handed", "admitted"


def tls_failure(exc: BaseException) -> tuple[str, str]:
    """Why a server-side TLS handshake failed, and what the client's operator should do."""
    reason = str((exc.reason or exc) if isinstance(exc, ssl.SSLError) else exc)
    upper = reason.upper()
    if "CERTIFICATE" in upper:
        hint = "the client must present a certificate signed by dicom_receiver.tls.ca_cert"
    elif "WRONG_VERSION" in upper or "HTTP" in upper or "RECORD" in upper:
        hint = "the client does not speak TLS: plain DICOM goes to the receiver's plain port"
    elif isinstance(exc, TimeoutError):
        hint = "the client sent no TLS handshake in time"
    else:
        hint = "check the client's TLS settings"
    return reason, hint


class _Server(Protocol):
    def hand_over(self, sock: socket.socket, peer: Any, request: bytes | None) -> None: ...


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
    #: The whole A-ASSOCIATE-RQ, when it was peeked (plain connections), for the acceptor.
    request: bytes | None = None


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
        address = str(peer[0])
        backlog = len(self._inbox) > 4 * self._settings.max_pending_connections
        if backlog and not self._settings.address_listed(address):
            # The gate cannot keep up: the accept loop must not queue without bound.
            self._admission.refuse("pending_total", address)
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
        conn.request = bytes(data)
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
            reason, hint = tls_failure(exc)
            with self._lock:
                self._forget(conn)
            self._unregister(conn)
            self._admission.refuse("tls_handshake", conn.address, error=reason, hint=hint)
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
            self._server.hand_over(conn.sock, conn.peer, conn.request)
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
