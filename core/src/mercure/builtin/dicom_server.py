"""The receiver's listening servers: pynetdicom's, with the admission gate in front.

:class:`GuardedServer` hands every accepted connection to its
:class:`~mercure.builtin.dicom_admission.Gate` instead of starting an association at once;
the gate hands it back (:meth:`GuardedServer.hand_over`) when the peer has asked for an
association and a slot is free. :func:`install_guards` patches pynetdicom, once:

* a PDU longer than the receiver accepts is refused before it is read;
* a DIMSE message that cannot be decoded, or a PDU the protocol's state machine does not
  allow where it comes, aborts its association (pynetdicom lets the exception end its
  reader thread, with a traceback and no A-ABORT);
* sockets are watched with ``poll`` instead of ``select``, which fails for file descriptors
  above 1023: with that many connections open every new association would be dropped as if
  its peer had closed it.
"""

from __future__ import annotations

import gc
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from mercure.builtin.dicom_admission import Admission, AdmissionSettings
from mercure.builtin.dicom_gate import Gate
from mercure.builtin.dicom_pdu import MAX_ASSOCIATE_RQ

if TYPE_CHECKING:
    from mercure.builtin.dicom_store_scp import LeanStoreAcceptor

#: pynetdicom's own association limit, left far above the gate's so that it never decides.
_BACKSTOP_FACTOR = 4
ACSE_TIMEOUT = 60.0
GC_INTERVAL = 30.0

_installed = False
_install_lock = threading.Lock()


def configure_ae(ae: AE, settings: AdmissionSettings) -> None:
    """Timeouts and pynetdicom's association limit for a receiving AE."""
    ae.maximum_associations = _BACKSTOP_FACTOR * (
        settings.max_associations + settings.max_pending_connections
    )
    ae.network_timeout = settings.network_timeout
    ae.dimse_timeout = settings.network_timeout
    ae.acse_timeout = ACSE_TIMEOUT


class GuardedServer(ThreadedAssociationServer):
    """A pynetdicom association server whose connections pass the admission gate first."""

    #: The listen backlog: a burst of connections waits in the kernel, not refused by it.
    request_queue_size = 1024

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        admission: Admission,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        self.admission = admission
        self.gate = Gate(self, admission)
        self.pdu_limit = admission.settings.pdu_limit
        self._last_gc = time.monotonic()
        handlers = [
            (evt.EVT_CONN_OPEN, self.gate.on_conn_open),
            (evt.EVT_REQUESTED, self.gate.on_requested),
            *(evt_handlers or []),
        ]
        super().__init__(ae, address, ae_title, contexts, ssl_context, handlers)
        self.gate.start()

    def pdu_limit_now(self, assoc: Any) -> int:
        """The longest PDU to read for ``assoc``: its request may be longer than ``max_pdu``."""
        if assoc.is_established:
            return self.pdu_limit
        return max(self.pdu_limit, MAX_ASSOCIATE_RQ)

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.reuse_port:  # one of several receiver processes sharing the port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Accepted: to the gate, which hands it over when it asked for an association."""
        self.gate.submit(request, client_address)

    #: Serves the storage-only associations when set (see ``dicom_store_scp``).
    lean: LeanStoreAcceptor | None = None

    def hand_over(self, sock: socket.socket, peer: Any, request: bytes | None = None) -> None:
        """Start the association of a connection the gate admitted.

        The lean acceptor takes it when the gate peeked its whole request and that proposes
        only storage and verification; pynetdicom takes the others.
        """
        if request is not None and self.lean is not None:
            decided = self.lean.takes(request)
            if decided is not None:
                self.lean.start(sock, str(peer[0]), request, decided)
                return
        super().process_request(sock, peer)

    def service_actions(self) -> None:
        # pynetdicom collects garbage every 60 connections; under a flood of connections
        # that is many full collections a second, so collect on a clock instead.
        now = time.monotonic()
        if now - self._last_gc >= GC_INTERVAL:
            self._last_gc = now
            gc.collect()

    def shutdown(self) -> None:
        # Made with make_server, so the AE does not list it among the servers it started.
        socketserver.TCPServer.shutdown(self)
        self.gate.stop()
        if self.lean is not None:
            self.lean.stop()
        self.server_close()


def serve(
    ae: AE,
    address: tuple[str, int],
    handlers: list[Any],
    admission: Admission,
    *,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    lean: LeanStoreAcceptor | None = None,
) -> GuardedServer:
    """Start a :class:`GuardedServer` in a background thread and return it."""
    install_guards()
    server = ae.make_server(
        address,
        evt_handlers=handlers,
        ssl_context=ssl_context,
        server_class=GuardedServer,
        admission=admission,
        reuse_port=reuse_port,
    )
    assert isinstance(server, GuardedServer)
    server.lean = lean
    thread = threading.Thread(target=server.serve_forever, name="dicom-receiver", daemon=True)
    thread.start()
    return server


def _limited_recv(original: Callable[..., bytearray]) -> Callable[..., bytearray]:
    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
        server = getattr(self.assoc, "_server", None)
        if isinstance(server, GuardedServer) and nr_bytes > server.pdu_limit_now(self.assoc):
            # pynetdicom reads a PDU's length, then asks for that many bytes: refuse before
            # buffering them. Too few bytes make it close the connection (Evt17).
            if self.socket is not None:
                limit = server.pdu_limit_now(self.assoc)
                server.gate.abort(self.socket, "pdu_too_large", pdu_length=nr_bytes, limit=limit)
            return bytearray()
        return original(self, nr_bytes)

    return recv


def _ready(self: AssociationSocket) -> bool:
    """pynetdicom's ``AssociationSocket.ready``, with ``poll`` instead of ``select``."""
    sock = self.socket
    if sock is None or self._is_connected is False:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        ready = bool(poller.poll(0))
    except (OSError, ValueError):
        self.event_queue.put("Evt17")  # transport connection closed
        return False
    if isinstance(sock, ssl.SSLSocket):  # decrypted bytes poll cannot see
        return ready or bool(sock.pending())
    return ready


def _guarded_receive(original: Callable[..., None]) -> Callable[..., None]:
    def receive_primitive(self: DIMSEServiceProvider, primitive: Any) -> None:
        assoc = self.assoc
        server = getattr(assoc, "_server", None)
        if not isinstance(server, GuardedServer):
            original(self, primitive)
            return
        try:
            original(self, primitive)
        except Exception as exc:
            self.message = None
            sock = getattr(assoc.dul.socket, "socket", None)
            if sock is not None:
                server.gate.abort(sock, "malformed_message", error=repr(exc)[:200])

    return receive_primitive


def _guarded_action(original: Callable[..., None]) -> Callable[..., None]:
    def do_action(self: StateMachine, event: str) -> None:
        dul = self.dul
        server = getattr(dul.assoc, "_server", None)
        if not isinstance(server, GuardedServer):
            original(self, event)
            return
        state = self.current_state
        try:
            original(self, event)
        except Exception as exc:
            dul.kill_dul()  # the reader ends; the association sees it and ends too
            sock = getattr(dul.socket, "socket", None)
            if sock is not None:
                server.gate.abort(
                    sock, "protocol_error", fsm_event=event, state=state, error=repr(exc)[:200]
                )

    return do_action


def install_guards() -> None:
    """Patch pynetdicom once (see the module docstring); a no-op for requestors."""
    global _installed
    with _install_lock:
        if _installed:
            return
        AssociationSocket.recv = _limited_recv(AssociationSocket.recv)  # type: ignore[method-assign]
        AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
        DIMSEServiceProvider.receive_primitive = _guarded_receive(  # type: ignore[method-assign]
            DIMSEServiceProvider.receive_primitive
        )
        StateMachine.do_action = _guarded_action(StateMachine.do_action)  # type: ignore[method-assign]
        _installed = True
