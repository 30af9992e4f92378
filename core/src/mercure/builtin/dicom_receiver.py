"""The built-in DICOM receiver: a C-STORE / C-ECHO SCP that writes into the incoming spool.

An instance is answered Success only after it is on disk durably (temporary name, fsync,
rename). Anything that cannot be kept, or that is malformed, is answered with a failure status
and a comment, so that the sender keeps it and retries; the association goes on.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from mercure import dimse_tuning, hookimpl, mpps
from mercure.builtin.dicom_acceptance import Acceptance
from mercure.builtin.dicom_admission import Admission, AdmissionSettings, ReceiverStats
from mercure.builtin.dicom_gate import tls_failure
from mercure.builtin.dicom_negotiation import NegotiationSettings
from mercure.builtin.dicom_server import configure_ae, serve
from mercure.builtin.dicom_store_scp import LeanStoreAcceptor, lean_enabled
from mercure.builtin.dicom_store_wire import MetaBuffer
from mercure.config import Config, DicomReceiverConfig, ReceiverTLSConfig
from mercure.dicomstream import TruncatedDatasetError, check_dataset, top_level_value
from mercure.fsutil import is_valid_uid
from mercure.jobs.incoming import IncomingSpool
from mercure.jobs.journal import ReceiveJournal, journal_enabled, recover_all
from mercure.logs import get_logger
from mercure.receivers import Receiver, ReceiverContext
from mercure.registry import RegisterFn
from mercure.tags import read_tags, with_receiver_tags

log = get_logger("mercure.receiver")

#: The syntaxes of the non-storage services (verification, MPPS). Storage contexts are
#: negotiated per association by :mod:`mercure.builtin.dicom_negotiation`.
UNCOMPRESSED = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
]

SERIES_INSTANCE_UID = 0x0020000E
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_NOT_AUTHORIZED = 0x0124  # Refused: not authorized (C-STORE)

_PREAMBLE = b"\x00" * 128 + b"DICM"


TLS_HANDSHAKE_TIMEOUT = 30.0


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands later, in the connection's own thread.

    pynetdicom wraps each accepted socket in its accept loop; with the handshake done there, one
    client that connects and sends nothing would block every other TLS association. The
    admission gate (:mod:`mercure.builtin.dicom_admission`) shakes hands without blocking;
    :func:`_tls_handshake` then finds it done and logs the client's certificate.
    """

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


class ReceiverStartError(RuntimeError):
    """The receiver cannot start as configured (bad TLS files, ...)."""


def server_tls_context(tls: ReceiverTLSConfig) -> ssl.SSLContext:
    """The receiver's TLS context: its certificate, and only ``ca_cert`` trusted for clients."""
    for field, path in (("key", tls.key), ("cert", tls.cert), ("ca_cert", tls.ca_cert)):
        if path and not Path(path).is_file():
            raise ReceiverStartError(
                f"DICOM TLS receiver: dicom_receiver.tls.{field} file {path} does not exist or "
                "is not a file; fix the path or remove the tls section"
            )
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key, password=tls.key_password or "")
    except ssl.SSLError as exc:
        raise ReceiverStartError(
            f"DICOM TLS receiver: cannot load certificate {tls.cert} with key {tls.key}: "
            f"{exc.reason or exc}; check that both are PEM files, that the key belongs to the "
            "certificate, and key_password if the key is encrypted"
        ) from exc
    if tls.ca_cert:
        try:
            context.load_verify_locations(cafile=tls.ca_cert)
        except ssl.SSLError as exc:
            raise ReceiverStartError(
                f"DICOM TLS receiver: ca_cert {tls.ca_cert} holds no PEM certificate "
                f"({exc.reason or exc})"
            ) from exc
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca_cert else ssl.CERT_NONE
    return context


def _tls_handshake(sock: ssl.SSLSocket, address: str) -> None:
    """Complete a deferred server handshake; on failure log why and close the connection."""
    previous = sock.gettimeout()
    try:
        sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
        sock.do_handshake()
        sock.settimeout(previous)
    except (OSError, ValueError) as exc:
        reason, hint = tls_failure(exc)
        log.warning(
            "DICOM TLS handshake failed; connection closed",
            address=address,
            reason=reason,
            hint=hint,
        )
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    peer = sock.getpeercert()
    if peer:
        subject = ", ".join("=".join(item) for rdn in peer.get("subject", ()) for item in rdn)
        log.info("DICOM TLS connection", address=address, client_cert=subject)


@dataclass(frozen=True)
class Requestor:
    """Who sent an instance: the peer's address, its AE title and the AE title it called."""

    address: str
    ae_title: str
    called_ae: str

    @property
    def sender(self) -> str:
        return f"{self.ae_title}@{self.address}"


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class DicomReceiverSettings(DicomReceiverConfig):
    """mercure's ``dicom_receiver`` section plus the top-level fields the receiver uses."""

    port: int = 11112
    accept_compressed_images: bool = False

    @classmethod
    def from_config(cls, config: Config) -> DicomReceiverSettings:
        return cls.model_validate(
            {
                **config.dicom_receiver.model_dump(),
                "port": config.port,
                "accept_compressed_images": config.accept_compressed_images,
            }
        )


class DicomReceiver(Receiver[DicomReceiverSettings]):
    """pynetdicom SCP on ``config.port`` (and a DICOM TLS port when configured)."""

    def __init__(
        self, name: str, settings: DicomReceiverSettings, context: ReceiverContext
    ) -> None:
        super().__init__(name, settings, context)
        self.config = settings  # port, accept_compressed_images
        self.extra_tags = list(self.settings.additional_tags)
        #: Routing tags by series UID, of the first instance this process parsed (see keep).
        self._series_tags: dict[str, dict[str, str]] = {}
        self.servers: list[ThreadedAssociationServer] = []
        self.on_stored: Callable[[str, str], None] | None = None
        #: Connection and refusal counters of both ports (see ``dicom_admission``).
        self.stats = ReceiverStats()
        self.admission = Admission(AdmissionSettings.from_config(self.settings), self.stats)
        #: Storage of any SOP class in the sender's own syntax (see ``dicom_negotiation``).
        self.negotiation = NegotiationSettings(
            accept_compressed_images=self.config.accept_compressed_images,
            services={
                Verification: tuple(UNCOMPRESSED),
                mpps.MPPS_SOP_CLASS: tuple(UNCOMPRESSED),
            },
        )
        self.acceptance = Acceptance(self.negotiation)

    # -- lifecycle ---------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.require_called_aet = False
        if self.settings.allowed_calling_aets:
            ae.require_calling_aet = list(self.settings.allowed_calling_aets)
        # Only the services: storage contexts are decided per association (self.acceptance).
        ae.add_supported_context(Verification, UNCOMPRESSED)
        mpps.add_context(ae, UNCOMPRESSED)
        configure_ae(ae, self.admission.settings)
        self.acceptance.serve(ae)
        return ae

    def _handlers(self) -> Any:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.handle_open),
            *self.acceptance.handlers(),
            *mpps.handlers(self.spool.folder, self._allowed, fsync=self.spool.fsync),
        ]

    #: Set by the supervisor when several receiver processes share the port.
    reuse_port = False
    #: Whose receive journal this process writes (``incoming/.journal/<owner>``); the main
    #: process recovers every journal at start, a worker process its own.
    journal_owner = "main"
    journal: ReceiveJournal | None = None

    def _serve(
        self, ae: AE, address: tuple[str, int], ssl_context: ssl.SSLContext | None = None
    ) -> ThreadedAssociationServer:
        """Start a server behind the admission gate; with ``reuse_port``, one sharing the port.

        Plain storage associations go to the lean acceptor (``dicom_store_scp``) unless
        ``MERCURE_LEAN_SCP=0``; TLS and the other services to pynetdicom.
        """
        lean = None
        if ssl_context is None and lean_enabled():
            lean = LeanStoreAcceptor(self, self.negotiation, self.admission)
        return serve(
            ae,
            address,
            self._handlers(),
            self.admission,
            reuse_port=self.reuse_port and ssl_context is None,
            ssl_context=ssl_context,
            lean=lean,
        )

    def _open_journal(self) -> None:
        """Recover what an unclean stop left in the journals, then journal from now on."""
        if self.journal_owner == "main":
            recover_all(self.spool)
        if self.spool.fsync and journal_enabled():
            self.journal = ReceiveJournal(self.spool, self.journal_owner)
            self.journal.open()

    def start(self) -> None:
        self._open_journal()
        dimse_tuning.install()
        ae = self._make_ae()
        address = (self.settings.bind_address, self.config.port)
        server = self._serve(ae, address)
        self.servers.append(server)
        log.info("DICOM receiver listening", address=address[0], port=self.port)
        tls = self.settings.tls
        if tls is not None:
            tls_server = self._serve(
                self._make_ae(),
                (self.settings.bind_address, tls.port),
                ssl_context=server_tls_context(tls),
            )
            self.servers.append(tls_server)
            log.info(
                "DICOM TLS receiver listening",
                address=self.settings.bind_address,
                port=tls_server.server_address[1],
                client_cert="required" if tls.require_client_cert else "optional",
            )

    @property
    def port(self) -> int:
        """The port actually bound (useful when the configuration asks for port 0)."""
        return int(self.servers[0].server_address[1])

    @property
    def ports(self) -> list[int]:
        return [int(s.server_address[1]) for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
        self.servers.clear()
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    # -- handlers ----------------------------------------------------------------------------

    def _allowed(self, event: Any) -> bool:
        return self.address_allowed(event.assoc.requestor.address)

    def handle_open(self, event: Any) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if isinstance(sock, ssl.SSLSocket):
                _tls_handshake(sock, event.assoc.requestor.address)

    def handle_echo(self, event: Any) -> int:
        if not self._allowed(event):
            return STATUS_NOT_AUTHORIZED
        return STATUS_SUCCESS

    def handle_store(self, event: Any) -> int | Dataset:
        requestor = event.assoc.requestor
        who = Requestor(
            address=str(requestor.address),
            ae_title=str(requestor.ae_title).strip(),
            # The AE title the sender called (mercure's receiver AET), not our own title.
            called_ae=str(
                getattr(requestor.primitive, "called_ae_title", None)
                or event.assoc.acceptor.ae_title
            ).strip(),
        )
        if not self._allowed(event):
            log.warning(
                "refused instance from an address not in allowed_addresses", sender=who.sender
            )
            return _status(STATUS_NOT_AUTHORIZED, "address not allowed")
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        meta = MetaBuffer()
        write_file_meta_info(meta, event.file_meta, enforce_standard=True)
        stream = request.DataSet.getbuffer()
        try:
            return self.keep(
                who,
                sop_uid,
                UID(event.context.transfer_syntax),
                _PREAMBLE + meta.getvalue(),
                stream,
            )
        finally:
            del stream  # release the export so pynetdicom can reuse the buffer

    #: How many series' routing tags :meth:`keep` remembers (a few per association).
    SERIES_TAGS_CACHE = 256

    def _known_series_tags(self, stream: memoryview, transfer_syntax: str) -> dict[str, str] | None:
        """The routing tags of an earlier instance of this series, if the spool uses no others.

        Parsing a dataset's tags costs about a millisecond; the spool keeps the tags of a
        series' first instance only, so later instances of a series whose folder holds its
        tags need only their Series Instance UID, found by walking element headers.
        """
        raw = top_level_value(stream, transfer_syntax, SERIES_INSTANCE_UID)
        if raw is None:
            return None
        series_uid = raw.rstrip(b"\x00 ").decode("ascii", "replace")
        tags = self._series_tags.get(series_uid)
        if tags is None or not self.spool.has_series_tags(series_uid):
            return None
        return tags

    def _remember_series_tags(self, series_uid: str, tags: dict[str, str]) -> None:
        if series_uid in self._series_tags:
            return
        if len(self._series_tags) >= self.SERIES_TAGS_CACHE:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del self._series_tags[next(iter(self._series_tags))]
        self._series_tags[series_uid] = tags

    def address_allowed(self, address: str) -> bool:
        allowed = self.settings.allowed_addresses
        return not allowed or address in allowed

    def keep(
        self,
        who: Requestor,
        sop_uid: str,
        transfer_syntax: str,
        header: bytes,
        stream: memoryview,
        written: Path | None = None,
    ) -> int | Dataset:
        """Check one received instance and put it in the spool; the status to answer.

        ``header`` is the preamble and file meta, ``stream`` the dataset as sent. With
        ``written`` both are already in that temporary file (fdatasync-ed), which is placed
        into the spool on success and left to the caller otherwise.
        """
        sender = who.sender
        if not is_valid_uid(sop_uid):
            log.warning("refused instance: invalid SOP Instance UID", sender=sender, uid=sop_uid)
            return _status(STATUS_CANNOT_UNDERSTAND, "invalid SOP Instance UID")
        try:
            check_dataset(stream, UID(transfer_syntax))
        except TruncatedDatasetError as exc:
            log.warning(
                "refused instance: malformed or truncated dataset",
                sender=sender,
                sop_uid=sop_uid,
                reason=str(exc),
            )
            return _status(STATUS_CANNOT_UNDERSTAND, f"malformed or truncated dataset: {exc}")
        try:
            tags = self._known_series_tags(stream, transfer_syntax)
            if tags is None:
                source = header + bytes(stream) if written is None else str(written)
                tags = read_tags(source, self.extra_tags)
        except Exception as exc:
            log.warning(
                "refused instance: not a readable DICOM dataset",
                sender=sender,
                sop_uid=sop_uid,
                reason=repr(exc),
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed")
        series_uid = tags.get("SeriesInstanceUID", "")
        if not series_uid:
            log.warning("refused instance: no SeriesInstanceUID", sender=sender, sop_uid=sop_uid)
            return _status(STATUS_CANNOT_UNDERSTAND, "SeriesInstanceUID missing")
        if not is_valid_uid(series_uid):
            log.warning(
                "refused instance: invalid SeriesInstanceUID",
                sender=sender,
                sop_uid=sop_uid,
                series_uid=series_uid,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "invalid SeriesInstanceUID")
        self._remember_series_tags(series_uid, tags)
        tags = with_receiver_tags(
            tags,
            sender_address=who.address,
            sender_aet=who.ae_title,
            receiver_aet=who.called_ae,
        )
        try:
            if written is None and self.journal is not None:
                self.journal.store(series_uid, sop_uid, [header, stream], tags)
            elif written is None:
                self.spool.store(series_uid, sop_uid, [header, stream], tags)
            else:
                self.spool.place(series_uid, sop_uid, written, tags)
        except OSError as exc:
            log.error(
                "cannot store instance; answered 'out of resources' so the sender retries",
                sender=sender,
                sop_uid=sop_uid,
                error=str(exc),
            )
            return _status(STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        if self.on_stored is not None:
            self.on_stored(series_uid, sop_uid)
        return STATUS_SUCCESS


@hookimpl
def register_receivers(register: RegisterFn) -> None:
    register("dicom", DicomReceiverSettings, DicomReceiver)


def dicom_receiver_for(config: Config, spool: IncomingSpool) -> DicomReceiver:
    """The built-in receiver as mercure's ``port`` and ``dicom_receiver`` configure it."""
    context = ReceiverContext("receiver", "dicom", config.appliance_name, spool=spool)
    return DicomReceiver("dicom", DicomReceiverSettings.from_config(config), context)
