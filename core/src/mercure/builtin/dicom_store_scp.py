"""A lean acceptor for storage associations: C-STORE and C-ECHO without pynetdicom's DIMSE layer.

pynetdicom decodes every PDU into primitives, copies each dataset through several buffers and
passes messages between two threads per association; on two cores that cost about as much
as the rest of the router together. This acceptor serves the associations that only store
(and verify): it answers the A-ASSOCIATE-RQ the admission gate has already checked, with the
same negotiation policy (:mod:`mercure.builtin.dicom_negotiation`); then it reads P-DATA-TF
PDUs straight from the socket into one buffer, keeps a dataset in memory up to
:data:`SPILL_BYTES` and streams a larger one into a temporary file of the spool as it
arrives (flat memory for a 1 GiB multi-frame), and answers each C-STORE only once the
receiver's :meth:`~mercure.builtin.dicom_receiver.DicomReceiver.keep` has it on disk durably.

Everything else (MPPS, TLS, a request that also proposes another service) stays with
pynetdicom: :meth:`LeanStoreAcceptor.takes` decides per association. ``MERCURE_LEAN_SCP=0``
in the environment turns the lean path off.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from mercure.builtin import dicom_pdu
from mercure.builtin.dicom_admission import Admission
from mercure.builtin.dicom_negotiation import (
    NegotiationSettings,
    Outcome,
    ProposedContext,
    negotiate,
)
from mercure.builtin.dicom_store_wire import (
    ABORT,
    APPLICATION_CONTEXT,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    MCH_COMMAND,
    MCH_LAST,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    Command,
    MalformedCommand,
    associate_ac,
    file_meta_header,
    parse_command,
    pdata,
    response_command,
)
from mercure.logs import get_logger

if TYPE_CHECKING:
    from mercure.builtin.dicom_receiver import DicomReceiver, Requestor

log = get_logger("mercure.receiver")

LEAN_ENV = "MERCURE_LEAN_SCP"


#: Datasets up to this size are kept in memory and written with one call; larger ones go to
#: a temporary file as their fragments arrive.
SPILL_BYTES = 4 << 20
#: The socket reads of one association land in a buffer of this size.
READ_BUFFER = 1 << 20
#: A command set is a few hundred bytes; more is not a command.
MAX_COMMAND = 64 * 1024

STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_AUTHORIZED = 0x0124


def lean_enabled() -> bool:
    """Whether the lean acceptor serves storage associations (``MERCURE_LEAN_SCP`` not 0)."""
    return os.environ.get(LEAN_ENV, "1").strip() not in ("0", "false", "no", "off")


class ProtocolError(Exception):
    """The peer broke the upper-layer or DIMSE protocol; the association is aborted."""

    def __init__(self, message: str, refusal: str = "protocol_error") -> None:
        super().__init__(message)
        self.refusal = refusal


class PeerGone(Exception):
    """The connection ended (closed, reset, timed out, or the receiver stopped)."""


# -- the association --------------------------------------------------------------------------


@dataclass
class _Instance:
    """A C-STORE whose dataset is arriving: in memory, or spilled to a temporary file."""

    command: Command
    context_id: int
    transfer_syntax: str
    storage: bool
    data: bytearray
    size: int = 0
    fd: int = -1
    tmp: Path | None = None
    header: bytes = b""

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


@dataclass
class _Reader:
    """Buffered reads from the socket: exact small reads, and streams of large values."""

    sock: socket.socket
    idle_timeout: float
    buf: bytearray = field(default_factory=lambda: bytearray(READ_BUFFER))
    start: int = 0
    end: int = 0
    #: When the PDU being read must have arrived (None between PDUs): a peer that stops, or
    #: drips a byte now and then, inside a PDU is cut off then.
    deadline: float | None = None

    def _recv_into(self, target: memoryview) -> int:
        if self.deadline is None:
            self.sock.settimeout(self.idle_timeout)
        else:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("the peer stopped in the middle of a PDU", "stalled")
            self.sock.settimeout(remaining)
        try:
            n = self.sock.recv_into(target)
        except TimeoutError as exc:
            if self.deadline is not None:
                raise ProtocolError("the peer stopped in the middle of a PDU", "stalled") from exc
            raise PeerGone("no data within the network timeout") from exc
        except OSError as exc:
            raise PeerGone(str(exc)) from exc
        if n == 0:
            raise PeerGone("connection closed by the peer")
        return n

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            self.buf[: self.end - self.start] = self.buf[self.start : self.end]
            self.end -= self.start
            self.start = 0
        self.end += self._recv_into(memoryview(self.buf)[self.end :])

    def exact(self, n: int) -> bytes:
        while self.end - self.start < n:
            self._fill()
        data = bytes(self.buf[self.start : self.start + n])
        self.start += n
        return data

    def read_into(self, target: memoryview) -> None:
        """Fill ``target``: first from the buffer, the rest straight from the socket."""
        have = min(len(target), self.end - self.start)
        target[:have] = self.buf[self.start : self.start + have]
        self.start += have
        pos = have
        while pos < len(target):
            pos += self._recv_into(target[pos:])

    def stream(self, n: int, sink: Callable[[memoryview], None]) -> None:
        view = memoryview(self.buf)
        while n:
            if self.start == self.end:
                self._fill()
            take = min(n, self.end - self.start)
            sink(view[self.start : self.start + take])
            self.start += take
            n -= take


class LeanAssociation:
    """One storage association, served on its own thread from the A-ASSOCIATE-RQ on."""

    def __init__(
        self,
        acceptor: LeanStoreAcceptor,
        sock: socket.socket,
        address: str,
        request: bytes,
        primitive: Any,
        outcomes: list[Outcome],
    ) -> None:
        from mercure.builtin.dicom_receiver import Requestor

        self.acceptor = acceptor
        self.receiver = acceptor.receiver
        self.sock = sock
        self.request = request
        self.outcomes = {o.context_id: o for o in outcomes if o.accepted}
        self.all_outcomes = outcomes
        self.who: Requestor = Requestor(
            address=address,
            ae_title=str(primitive.calling_ae_title).strip(),
            called_ae=str(primitive.called_ae_title).strip(),
        )
        self.timeout = acceptor.admission.settings.network_timeout
        self.reader = _Reader(sock, self.timeout)
        self.data = bytearray()
        self.current: _Instance | None = None
        self.command = bytearray()
        self.command_context = 0

    # -- life -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.reader.exact(len(self.request))  # the request, peeked by the gate
            if not self._associate():
                return
            self._serve()
        except PeerGone as exc:
            if self.current is not None:
                log.warning(
                    "association ended in the middle of an instance; it was not stored",
                    sender=self.who.sender,
                    sop_uid=self.current.command.sop_instance,
                    reason=str(exc),
                )
        except ProtocolError as exc:
            self.acceptor.admission.refuse(
                exc.refusal, self.who.address, calling_ae=self.who.ae_title, error=str(exc)
            )
            with contextlib.suppress(OSError):
                self.sock.sendall(dicom_pdu.abort_pdu(dicom_pdu.ABORT_UNEXPECTED_PDU))
        except Exception:
            log.exception("lean DICOM association failed; aborted", sender=self.who.sender)
            with contextlib.suppress(OSError):
                self.sock.sendall(dicom_pdu.abort_pdu(dicom_pdu.ABORT_NOT_SPECIFIED))
        finally:
            if self.current is not None:
                self.current.discard()
                self.current = None
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _associate(self) -> bool:
        settings = self.receiver.settings
        allowed = self.acceptor.admission.settings.allowed_calling_aets
        if allowed and self.who.ae_title not in allowed:
            log.warning(
                "association rejected: calling AE title not in allowed_calling_aets",
                sender=self.who.sender,
            )
            self.sock.sendall(dicom_pdu.reject_pdu(0x01, 0x01, 0x03))
            return False
        called, calling = self.request[10:26], self.request[26:42]
        max_pdu = int(settings.max_pdu)
        self.sock.sendall(associate_ac(called, calling, self.all_outcomes, max_pdu))
        return True

    def _serve(self) -> None:
        limit = self.acceptor.admission.settings.pdu_limit
        reader = self.reader
        while True:
            reader.deadline = None
            pdu_type, _, length = struct.unpack(">BBI", reader.exact(6))
            reader.deadline = time.monotonic() + self.timeout
            if pdu_type == P_DATA_TF:
                if length > limit:
                    raise ProtocolError(f"P-DATA-TF of {length} bytes", "pdu_too_large")
                self._pdata(length)
            elif pdu_type == RELEASE_RQ:
                if length > 64:
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes")
                reader.exact(length)
                self.sock.sendall(struct.pack(">BBI", RELEASE_RP, 0, 4) + bytes(4))
                return
            elif pdu_type == ABORT:
                return
            else:
                raise ProtocolError(f"unexpected PDU of type 0x{pdu_type:02X}")

    def _pdata(self, length: int) -> None:
        reader = self.reader
        while length:
            if length < 6:
                raise ProtocolError("P-DATA-TF with a cut-off PDV item")
            (pdv_length,) = struct.unpack(">I", reader.exact(4))
            if pdv_length < 2 or pdv_length + 4 > length:
                raise ProtocolError(f"PDV item of length {pdv_length} in a PDU of {length}")
            context_id, mch = reader.exact(2)
            fragment = pdv_length - 2
            length -= 4 + pdv_length
            if mch & MCH_COMMAND:
                self._command_fragment(context_id, mch, fragment)
            else:
                self._data_fragment(context_id, mch, fragment)

    def _command_fragment(self, context_id: int, mch: int, size: int) -> None:
        if self.current is not None:
            raise ProtocolError("a command began before the previous dataset ended")
        if self.command and context_id != self.command_context:
            raise ProtocolError("command fragments on two presentation contexts")
        if len(self.command) + size > MAX_COMMAND:
            raise ProtocolError(
                f"a command set of more than {MAX_COMMAND} bytes", "malformed_message"
            )
        self.command_context = context_id
        self.command += self.reader.exact(size)
        if mch & MCH_LAST:
            raw, self.command = bytes(self.command), bytearray()
            try:
                command = parse_command(raw)
            except MalformedCommand as exc:
                raise ProtocolError(str(exc), "malformed_message") from exc
            self._on_command(context_id, command)

    def _on_command(self, context_id: int, command: Command) -> None:
        outcome = self.outcomes.get(context_id)
        if outcome is None:
            raise ProtocolError(f"a message on presentation context {context_id}, not accepted")
        if command.field == C_ECHO_RQ and not command.has_dataset:
            status = 0 if self.receiver.address_allowed(self.who.address) else STATUS_NOT_AUTHORIZED
            self._respond(context_id, C_ECHO_RSP, command, status, "")
            return
        if command.field == C_CANCEL_RQ:
            return
        if command.field != C_STORE_RQ or not command.has_dataset:
            raise ProtocolError(f"DIMSE command 0x{command.field:04X} is not served here")
        self.current = _Instance(
            command, context_id, str(outcome.transfer_syntax), outcome.storage, self.data
        )

    def _data_fragment(self, context_id: int, mch: int, size: int) -> None:
        instance = self.current
        if instance is None:
            raise ProtocolError("a dataset fragment without its command")
        if context_id != instance.context_id:
            raise ProtocolError("dataset fragments on another presentation context")
        if instance.fd < 0 and instance.size + size > SPILL_BYTES:
            self._spill(instance)
        if instance.fd >= 0:
            self.reader.stream(size, lambda view: _write_all(instance.fd, view))
        else:
            need = instance.size + size
            if len(instance.data) < need:
                self._grow(instance, need)
            with memoryview(instance.data) as target:
                self.reader.read_into(target[instance.size : need])
        instance.size += size
        if mch & MCH_LAST:
            self.current = None
            self._finish(instance)

    def _grow(self, instance: _Instance, need: int) -> None:
        """Make the in-memory dataset buffer (reused from instance to instance) hold ``need``."""
        data = instance.data
        more = max(need - len(data), min(len(data), SPILL_BYTES))
        try:
            data.extend(bytes(more))
        except BufferError:  # a view of it outlived its instance: start a new buffer
            data = bytearray(data)
            data.extend(bytes(more))
            instance.data = self.data = data

    def _spill(self, instance: _Instance) -> None:
        """Move a dataset that grew past :data:`SPILL_BYTES` to a temporary file."""
        instance.header = self._header(instance)
        instance.fd, instance.tmp = self.receiver.spool.open_tmp()
        _write_all(instance.fd, memoryview(instance.header))
        _write_all(instance.fd, memoryview(instance.data)[: instance.size])

    def _header(self, instance: _Instance) -> bytes:
        command = instance.command
        return file_meta_header(
            command.sop_class, command.sop_instance, instance.transfer_syntax, self.who.ae_title
        )

    def _finish(self, instance: _Instance) -> None:
        command = instance.command
        try:
            status, comment = self._keep(instance)
        finally:
            instance.discard()  # whatever was not placed into the spool
        self._respond(instance.context_id, C_STORE_RSP, command, status, comment)

    def _keep(self, instance: _Instance) -> tuple[int, str]:
        command = instance.command
        if not instance.storage:
            return STATUS_SOP_CLASS_NOT_SUPPORTED, "not a storage presentation context"
        if not self.receiver.address_allowed(self.who.address):
            log.warning(
                "refused instance from an address not in allowed_addresses", sender=self.who.sender
            )
            return STATUS_NOT_AUTHORIZED, "address not allowed"
        if instance.fd < 0:
            view = memoryview(instance.data)[: instance.size]
            try:
                result = self.receiver.keep(
                    self.who,
                    command.sop_instance,
                    instance.transfer_syntax,
                    self._header(instance),
                    view,
                )
            finally:
                view.release()
            return _status_of(result)
        try:
            if self.receiver.spool.fsync:
                os.fdatasync(instance.fd)
        except OSError as exc:
            return STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}"
        os.close(instance.fd)
        instance.fd = -1
        assert instance.tmp is not None
        with open(instance.tmp, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = memoryview(mapped)[len(instance.header) :]
            try:
                result = self.receiver.keep(
                    self.who,
                    command.sop_instance,
                    instance.transfer_syntax,
                    instance.header,
                    view,
                    written=instance.tmp,
                )
            finally:
                view.release()
        finally:
            mapped.close()
        status, comment = _status_of(result)
        if status == 0:
            instance.tmp = None  # placed into the spool
        return status, comment

    def _respond(
        self, context_id: int, field: int, command: Command, status: int, comment: str
    ) -> None:
        sop_class = command.sop_class or (Verification if field == C_ECHO_RSP else "")
        raw = response_command(
            field, command.message_id, sop_class, command.sop_instance, status, comment
        )
        try:
            self.sock.sendall(pdata(context_id, raw))
        except OSError as exc:
            raise PeerGone(str(exc)) from exc


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _status_of(result: int | Dataset) -> tuple[int, str]:
    if isinstance(result, int):
        return result, ""
    return int(result.Status or 0), str(result.get("ErrorComment", "") or "")


# -- the acceptor -----------------------------------------------------------------------------


class LeanStoreAcceptor:
    """Decides which admitted connections it serves and runs each on a thread of its own."""

    def __init__(
        self, receiver: DicomReceiver, negotiation: NegotiationSettings, admission: Admission
    ) -> None:
        self.receiver = receiver
        self.negotiation = negotiation
        self.admission = admission
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()

    def takes(self, request: bytes) -> tuple[Any, list[Outcome]] | None:
        """The decoded request and its outcomes if only storage or verification is proposed."""
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(request)
        primitive = pdu.to_primitive()
        if str(primitive.application_context_name) != APPLICATION_CONTEXT:
            return None  # pynetdicom rejects it with the reason the standard gives
        for item in primitive.user_information:
            if type(item).__name__ == "UserIdentityNegotiation":
                return None  # answered by pynetdicom's identity handling
        proposed = [
            ProposedContext(
                int(cx.context_id or 0),
                str(cx.abstract_syntax),
                tuple(str(ts) for ts in cx.transfer_syntax),
            )
            for cx in primitive.presentation_context_definition_list
        ]
        outcomes = negotiate(proposed, self.negotiation)
        for outcome in outcomes:
            if outcome.accepted and not outcome.storage and outcome.abstract_syntax != Verification:
                return None  # MPPS and the like: pynetdicom's services
        if not any(o.accepted for o in outcomes):
            return None
        return primitive, outcomes

    def start(
        self, sock: socket.socket, address: str, request: bytes, decided: tuple[Any, list[Outcome]]
    ) -> None:
        primitive, outcomes = decided
        association = LeanAssociation(self, sock, address, request, primitive, outcomes)

        def run() -> None:
            with self._lock:
                self._active.add(sock)
            try:
                association.run()
            finally:
                with self._lock:
                    self._active.discard(sock)

        threading.Thread(target=run, name=f"dicom-store-{address}", daemon=True).start()

    def stop(self) -> None:
        """End the associations still running (their instances in flight are not stored)."""
        with self._lock:
            active = list(self._active)
        for sock in active:
            with contextlib.suppress(OSError, ValueError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
