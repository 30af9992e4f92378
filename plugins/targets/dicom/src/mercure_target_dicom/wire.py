"""The DICOM upper-layer PDUs and the C-STORE command set, encoded and parsed directly.

Only what a C-STORE requestor needs (PS3.8 section 9.3, PS3.7 section 9.3.1 and annex E):
A-ASSOCIATE-RQ, -AC and -RJ, P-DATA-TF, A-RELEASE-RQ/RP and A-ABORT, and the C-STORE-RQ
and -RSP command sets (always Implicit VR Little Endian). It lets :mod:`.lean` write the
stored dataset bytes of a file straight into P-DATA-TF PDUs, without building a message in
memory first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: This sender's implementation class UID (derived under pydicom's UID root, as
#: ``generate_uid(entropy_srcs=["mercure-target-dicom lean C-STORE sender"])``) and version name.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.12957105425489803753656876295969206500"
IMPLEMENTATION_VERSION = "MERCURE_LEAN_1"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7})

#: PDV message control header bits (PS3.8 E.2).
MCH_COMMAND, MCH_LAST = 0x01, 0x02

#: Largest PDU this side sends when the peer sets no limit (its max length is 0).
UNLIMITED_PDU = 1 << 20
#: Overhead of a P-DATA-TF with one PDV: PDU header (6), PDV length (4), context id and MCH (2).
PDATA_OVERHEAD = 12


def _uid(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


def associate_rq(
    called: str,
    calling: str,
    contexts: Iterable[ProposedContext],
    max_pdu: int,
    async_window: int = 1,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; ``async_window`` > 1 proposes that many outstanding requests."""
    body = bytearray(struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32))
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for cx in contexts:
        sub = _item(0x30, cx.abstract_syntax.encode())
        for ts in cx.transfer_syntaxes:
            sub += _item(0x40, ts.encode())
        body += _item(0x20, struct.pack(">BBBB", cx.context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    if async_window > 1:
        # Maximum number of operations invoked (by us) and performed (by us: none).
        user += _item(0x53, struct.pack(">HH", async_window, 1))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode())
    body += _item(0x50, user)
    return struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + bytes(body)


@dataclass
class Accepted:
    """What an A-ASSOCIATE-AC granted: per context id its result and transfer syntax."""

    results: dict[int, tuple[int, str]] = field(default_factory=dict)
    max_pdu: int = 0  # the largest PDU (length field) the peer receives; 0 = no limit
    #: Outstanding requests this side may invoke (0 = unlimited; None: no window item).
    invoked: int | None = None


def parse_associate_ac(body: bytes) -> Accepted:
    """Parse the variable items of an A-ASSOCIATE-AC (``body`` after the 6-byte header)."""
    out = Accepted()
    pos = 68
    while pos + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, pos)
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind == 0x21 and len(value) >= 4:
            context_id, result = value[0], value[2]
            syntax = ""
            if len(value) >= 8 and value[4] == 0x40:
                (ts_len,) = struct.unpack_from(">H", value, 6)
                syntax = value[8 : 8 + ts_len].rstrip(b"\x00 ").decode("ascii", "replace")
            out.results[context_id] = (result, syntax)
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                skind, _, slen = struct.unpack_from(">BBH", value, sub)
                svalue = value[sub + 4 : sub + 4 + slen]
                sub += 4 + slen
                if skind == 0x51 and slen == 4:
                    (out.max_pdu,) = struct.unpack(">I", svalue)
                elif skind == 0x53 and slen == 4:
                    out.invoked, _ = struct.unpack(">HH", svalue)
    return out


def parse_reject(body: bytes) -> tuple[int, int, int]:
    """Result, source and reason of an A-ASSOCIATE-RJ."""
    return body[1], body[2], body[3]


def parse_abort(body: bytes) -> tuple[int, int]:
    """Source and reason of an A-ABORT."""
    return (body[2], body[3]) if len(body) >= 4 else (0, 0)


RELEASE_RQ_PDU = struct.pack(">BBI", RELEASE_RQ, 0, 4) + bytes(4)
ABORT_PDU = struct.pack(">BBI", ABORT, 0, 4) + bytes(4)  # source 0: service user


def pdata_header(context_id: int, mch: int, size: int) -> bytes:
    """Header of a P-DATA-TF holding one PDV of ``size`` bytes."""
    return struct.pack(">BBIIBB", P_DATA_TF, 0, size + 6, size + 2, context_id, mch)


def iter_pdvs(body: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(context id, message control header, fragment) of each PDV in a P-DATA-TF body."""
    pos = 0
    while pos + 6 <= len(body):
        (length,) = struct.unpack_from(">I", body, pos)
        if length < 2:
            raise ValueError(f"PDV item of length {length}")
        yield body[pos + 4], body[pos + 5], body[pos + 6 : pos + 4 + length]
        pos += 4 + length


# -- command sets (Implicit VR Little Endian, group 0000) -----------------------------------


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """The encoded command set of a C-STORE-RQ that is followed by a dataset."""
    elements = (
        _element(0x0002, _uid(sop_class))
        + _element(0x0100, struct.pack("<H", 0x0001))
        + _element(0x0110, struct.pack("<H", message_id))
        + _element(0x0700, struct.pack("<H", priority))
        + _element(0x0800, struct.pack("<H", 0x0000))
        + _element(0x1000, _uid(sop_instance))
    )
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


@dataclass(frozen=True)
class Response:
    """The parts of a DIMSE response command set this sender acts on."""

    command: int
    responding_to: int
    status: int | None
    comment: str
    has_dataset: bool


def parse_command(raw: bytes) -> Response:
    """Parse a command set; ``ValueError`` if it is not one."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        if group != 0x0000 or pos + 8 + length > len(raw):
            raise ValueError("not a DIMSE command set")
        values[elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length

    def us(elem: int) -> int | None:
        value = values.get(elem)
        return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None

    comment = values.get(0x0902, b"").rstrip(b"\x00 ").decode("latin-1", "replace")
    return Response(
        command=us(0x0100) or 0,
        responding_to=us(0x0120) or 0,
        status=us(0x0900),
        comment=comment,
        has_dataset=us(0x0800) not in (None, 0x0101),
    )


# -- the dataset of a Part 10 file ------------------------------------------------------------

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def dataset_offset(fh: BinaryIO) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble and the file meta group.

    The meta group is walked element by element (always Explicit VR Little Endian) rather than
    trusting (0002,0000), which some writers get wrong. ``ValueError`` if there is no meta.
    """
    fh.seek(0)
    head = fh.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError("no DICOM preamble (DICM)")
    pos = 132
    while True:
        fh.seek(pos)
        tag = fh.read(8)
        if len(tag) < 8:
            return pos  # nothing after the meta
        group, _ = struct.unpack_from("<HH", tag)
        if group != 0x0002:
            return pos
        vr = tag[4:6]
        if vr in _LONG_VRS:
            more = fh.read(4)
            if len(more) < 4:
                raise ValueError("file meta information is truncated")
            (length,) = struct.unpack("<I", more)
            if length == 0xFFFFFFFF:
                raise ValueError("undefined length in the file meta information")
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", tag, 6)
            pos += 8 + length
