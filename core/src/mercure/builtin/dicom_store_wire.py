"""The bytes of the storage acceptor: A-ASSOCIATE-AC, DIMSE command sets, file meta.

Pure functions over bytes (PS3.7 annex E, PS3.8 9.3), so they are tested and fuzzed without
a socket; :mod:`mercure.builtin.dicom_store_scp` speaks them on an association.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mercure.builtin.dicom_negotiation import Outcome

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: The receiver's implementation class UID (``generate_uid`` under pydicom's root with the
#: entropy "mercure receiver lean C-STORE acceptor") and version name.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.97016634829410543848933102681620739012"
IMPLEMENTATION_VERSION = "MERCURE_SCP_1"

P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
MCH_COMMAND, MCH_LAST = 0x01, 0x02
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030
NO_DATASET = 0x0101

_PREAMBLE = b"\x00" * 128 + b"DICM"


class MalformedCommand(ValueError):
    """A command set that cannot be decoded."""


def _uid(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_ac(called: bytes, calling: bytes, outcomes: list[Outcome], max_pdu: int) -> bytes:
    """The A-ASSOCIATE-AC PDU for ``outcomes`` (PS3.8 9.3.3); AE fields echo the request's."""
    body = struct.pack(">HH", 1, 0) + called + calling + bytes(32)
    body += _item(0x10, _uid(APPLICATION_CONTEXT))
    for outcome in outcomes:
        result = 0 if outcome.accepted else int(outcome.rejection or 3)
        syntax = _item(0x40, _uid(outcome.transfer_syntax or "1.2.840.10008.1.2"))
        body += _item(0x21, struct.pack(">BBBB", outcome.context_id, 0, result, 0) + syntax)
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
        + _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    )
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def response_command(
    command: int, message_id: int, sop_class: str, sop_instance: str, status: int, comment: str
) -> bytes:
    """An encoded C-STORE-RSP or C-ECHO-RSP command set (Implicit VR Little Endian)."""
    elements = _element(0x0002, _uid(sop_class)) + _element(0x0100, struct.pack("<H", command))
    elements += _element(0x0120, struct.pack("<H", message_id))
    elements += _element(0x0800, struct.pack("<H", NO_DATASET))
    elements += _element(0x0900, struct.pack("<H", status))
    if comment:
        raw = comment.encode("ascii", "replace")[:64]
        elements += _element(0x0902, raw + b" " if len(raw) % 2 else raw)
    if sop_instance:
        elements += _element(0x1000, _uid(sop_instance))
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


def pdata(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF holding one whole command set."""
    size = len(command)
    return struct.pack(">BBIIBB", P_DATA_TF, 0, size + 6, size + 2, context_id, 0x03) + command


@dataclass(frozen=True)
class Command:
    """The fields of a request command set the acceptor acts on."""

    field: int
    message_id: int
    sop_class: str
    sop_instance: str
    has_dataset: bool


def parse_command(raw: bytes) -> Command:
    """Decode a request command set; :class:`MalformedCommand` if it is not one."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        if group != 0x0000 or pos + 8 + length > len(raw):
            raise MalformedCommand("a command set that cannot be decoded")
        values[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    if pos != len(raw):
        raise MalformedCommand("a command set that cannot be decoded")

    def us(elem: int) -> int | None:
        value = values.get(elem, b"")
        return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else None

    def text(elem: int) -> str:
        return values.get(elem, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    command_field, message_id = us(0x0100), us(0x0110)
    if command_field is None or message_id is None:
        raise MalformedCommand("a command set without command field or message ID")
    return Command(
        command_field,
        message_id,
        text(0x0002),
        text(0x1000),
        us(0x0800) not in (None, NO_DATASET),
    )


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Preamble and file meta information (PS3.10 7.1) of the Part 10 file of an instance.

    Encoded directly (Explicit VR Little Endian): pydicom's writer costs a millisecond per
    instance, as long as receiving the instance.
    """
    elements = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _padded(sop_class, b"\x00"))
        + _meta_element(0x0003, b"UI", _padded(sop_instance, b"\x00"))
        + _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00"))
        + _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00"))
        + _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" "))
    )
    title = source_ae.strip()[:16]
    if title:
        elements += _meta_element(0x0016, b"AE", _padded(title, b" "))
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return _PREAMBLE + group_length + elements


class MetaBuffer:
    """Collects the encoded file meta information (pydicom writes it to a file-like)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def tell(self) -> int:
        return sum(len(p) for p in self.parts)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)
