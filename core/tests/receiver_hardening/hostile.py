"""Hostile and broken DICOM peers for the receiver's hardening tests.

A raw socket client that speaks exactly the bytes a test wants (PDUs are encoded with
pynetdicom's own PDU classes, then cut, bent or replaced), a flood of idle connections that
re-opens whatever the receiver closes, and an in-process receiver to point them at.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from mercure.builtin.dicom_receiver import DicomReceiver, dicom_receiver_for
from mercure.jobs.incoming import IncomingSpool
from mercure.testing import config_for
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
#: A second loopback address: "another host" for the receiver (Linux routes 127/8 to lo).
OTHER_HOST = "127.0.0.2"


# -- a receiver in this process ----------------------------------------------------------------


@contextlib.contextmanager
def running_receiver(tmp_path: Path, **settings: Any) -> Iterator[DicomReceiver]:
    """A DICOM receiver on a free loopback port writing into a spool under ``tmp_path``."""
    config = config_for(tmp_path, dicom_receiver={"bind_address": "127.0.0.1", **settings})
    receiver = dicom_receiver_for(config, IncomingSpool(config.folder("incoming"), fsync=False))
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def spool_files(receiver: DicomReceiver) -> list[Path]:
    """Every file under the receiver's incoming folder (temporary ones included)."""
    return sorted(p for p in receiver.spool.folder.rglob("*") if p.is_file())


def stored_sop_uids(receiver: DicomReceiver) -> set[str]:
    return {p.stem for p in spool_files(receiver) if p.suffix == ".dcm"}


# -- PDUs --------------------------------------------------------------------------------------


def associate_rq(
    calling: str = "HOSTILE",
    called: str = "MERCURE",
    contexts: list[tuple[str, list[str]]] | None = None,
    max_pdu: int = 16382,
) -> bytes:
    """A well-formed A-ASSOCIATE-RQ, encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = []
    for i, (abstract, syntaxes) in enumerate(
        contexts or [(CTImageStorage, [ExplicitVRLittleEndian])]
    ):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * i + 1
        items.append(context)
    primitive.presentation_context_definition_list = items
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def many_contexts_rq(count: int, *, realistic: bool) -> bytes:
    """An A-ASSOCIATE-RQ with ``count`` presentation contexts, built byte by byte.

    ``realistic`` contexts carry real UIDs (about 60 bytes each); the others are as short as
    an item can be, so that thousands fit in a request of ordinary size.
    """
    abstract = CTImageStorage.encode() if realistic else b"1"
    syntax = ExplicitVRLittleEndian.encode() if realistic else b"1"
    contexts = b"".join(
        _item(
            0x20, bytes([(2 * i + 1) % 256, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, syntax)
        )
        for i in range(count)
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16382)))
    body = (
        struct.pack(">HH", 1, 0)
        + b"MERCURE".ljust(16)
        + b"HOSTILE".ljust(16)
        + b"\0" * 32
        + _item(0x10, APPLICATION_CONTEXT.encode())
        + contexts
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def store_pdus(
    dataset: bytes, sop_uid: str, *, context_id: int = 1, max_pdu: int = 16382, message_id: int = 1
) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ carrying ``dataset`` (encoded, explicit VR LE)."""
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_uid
    request.Priority = 2
    request.DataSet = BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(bytes(pdu.encode()))
    return pdus


def element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` may lie about the value's length."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, size) + value
    return struct.pack("<HH2sH", group, elem, vr, size) + value


def dataset_header(sop_uid: str, series_uid: str = "1.2.826.0.1.3680043.9.7.1") -> bytes:
    """The first elements of a CT instance: enough for the receiver to route it."""

    def ui(value: str) -> bytes:
        raw = value.encode()
        return raw + b"\0" * (len(raw) % 2)

    return (
        element(0x0008, 0x0016, b"UI", ui(CTImageStorage))
        + element(0x0008, 0x0018, b"UI", ui(sop_uid))
        + element(0x0020, 0x000E, b"UI", ui(series_uid))
    )


def deeply_nested(depth: int) -> bytes:
    """``depth`` sequences of undefined length, each inside an item of the one before."""
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


# -- a raw client ------------------------------------------------------------------------------


@dataclass
class Pdu:
    pdu_type: int
    body: bytes

    @property
    def name(self) -> str:
        return PDU_NAMES.get(self.pdu_type, f"0x{self.pdu_type:02X}")


class RawPeer:
    """A TCP connection to the receiver that sends whatever bytes it is given."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def read_pdu(self) -> Pdu | None:
        """The next PDU from the receiver, or None once it closed the connection."""
        try:
            header = self._read(6)
            if len(header) < 6:
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            return Pdu(pdu_type, self._read(length))
        except (ConnectionResetError, BrokenPipeError):
            return None

    def read_all(self) -> list[Pdu]:
        """Every PDU until the receiver closes the connection."""
        pdus = []
        while (pdu := self.read_pdu()) is not None:
            pdus.append(pdu)
        return pdus

    def associate(self, **kwargs: Any) -> Pdu:
        self.send(associate_rq(**kwargs))
        answer = self.read_pdu()
        assert answer is not None, "the receiver closed the connection instead of answering"
        return answer

    def store_status(self) -> int:
        """Read the C-STORE response and return its status."""
        command = b""
        while True:
            pdu = self.read_pdu()
            assert pdu is not None, "the receiver closed the connection instead of answering"
            assert pdu.name == "P-DATA-TF", f"expected a C-STORE response, got {pdu.name}"
            pos = 0
            while pos < len(pdu.body):
                (length,) = struct.unpack_from(">L", pdu.body, pos)
                header, fragment = pdu.body[pos + 5], pdu.body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if header & 0x01:
                    command += fragment
                    if header & 0x02:
                        return int(decode(BytesIO(command), True, True).Status)

    def is_closed_by_peer(self) -> bool:
        """Block until the receiver closes the connection; True if it did (nothing more read)."""
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- a flood of idle connections ---------------------------------------------------------------


@dataclass
class IdleFlood:
    """``count`` connections from ``source`` that send nothing; whatever the receiver closes
    is opened again at once, for as long as the flood runs."""

    port: int
    count: int
    source: str = OTHER_HOST
    reopened: int = 0
    open_now: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> IdleFlood:
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)
        self._thread.start()
        assert self._ready.wait(60), "the flood could not open its connections"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=5, source_address=(self.source, 0)
            )
        except OSError:
            return None
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            sock = self._connect()
            if sock is not None:
                selector.register(sock, selectors.EVENT_READ)
        self.open_now = len(selector.get_map())
        self._ready.set()
        missing = self.count - self.open_now
        while not self._stop.is_set():
            for key, _ in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                sock.close()
                missing += 1
            for _ in range(missing):
                sock = self._connect()
                if sock is None:
                    break
                selector.register(sock, selectors.EVENT_READ)
                missing -= 1
                self.reopened += 1
            self.open_now = len(selector.get_map())
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


def random_bytes(seed: int, count: int) -> bytes:
    return random.Random(seed).randbytes(count)


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
