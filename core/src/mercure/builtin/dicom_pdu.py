"""Checks of the first PDU a peer sends, before pynetdicom spends threads or memory on it.

A peer's first PDU must be an A-ASSOCIATE-RQ (PS3.8 9.3.2). The receiver's admission gate
(:mod:`mercure.builtin.dicom_admission`) reads it without consuming it and hands the
connection to pynetdicom only when :func:`check_associate_rq` accepts it, so a PDU that
pynetdicom could not decode, or one that would make it build thousands of presentation
contexts, never gets that far. Everything here works on bytes alone: it is fuzzed directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: The largest A-ASSOCIATE-RQ accepted: 128 presentation contexts (all the context IDs there
#: are) with about 25 transfer syntaxes each still fit; real requests are a few kilobytes.
MAX_ASSOCIATE_RQ = 256 * 1024
#: Presentation context IDs are odd numbers 1-255 (PS3.8 9.3.2.2): no request needs more.
MAX_PRESENTATION_CONTEXTS = 128
#: Sub-items of the user information item: role selection and extended negotiation items for
#: every context, plus the handful of single ones.
MAX_USER_INFO_SUB_ITEMS = 4 * MAX_PRESENTATION_CONTEXTS + 16

HEADER_LENGTH = 6
_FIXED_FIELDS = 68  # protocol version, reserved, called AE, calling AE, reserved (PS3.8 9-11)

# A-ABORT reasons when the source is the service provider (PS3.8 table 9-26).
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_INVALID_PARAMETER = 0x06

_PDU_TYPES = range(0x01, 0x08)
_TOP_ITEMS = {0x10: "application context", 0x20: "presentation context", 0x50: "user information"}
_CONTEXT_SUB_ITEMS = {0x30: "abstract syntax", 0x40: "transfer syntax"}
_USER_SUB_ITEMS = range(0x51, 0x5A)


class MalformedPDU(ValueError):
    """The peer's PDU is not one the receiver accepts; ``abort_reason`` is for its A-ABORT."""

    def __init__(self, message: str, abort_reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


@dataclass(frozen=True)
class AssociateRequest:
    """What the admission gate needs from an A-ASSOCIATE-RQ."""

    calling_ae: str
    called_ae: str
    presentation_contexts: int


def check_first_header(header: bytes) -> int:
    """Return the length of the whole first PDU (header included) from its 6-byte header.

    Raises :class:`MalformedPDU` unless it announces an A-ASSOCIATE-RQ of a sane length.
    """
    if len(header) < HEADER_LENGTH:
        raise MalformedPDU(f"PDU header cut off after {len(header)} bytes", ABORT_NOT_SPECIFIED)
    pdu_type, _, length = struct.unpack_from(">BBL", header)
    if pdu_type not in _PDU_TYPES:
        raise MalformedPDU(
            f"not DICOM: first byte 0x{pdu_type:02X} is no PDU type", ABORT_UNRECOGNIZED_PDU
        )
    if pdu_type != 0x01:
        raise MalformedPDU(
            f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU
        )
    if length < _FIXED_FIELDS:
        raise MalformedPDU(f"A-ASSOCIATE-RQ of {length} bytes is shorter than its fixed fields")
    if length > MAX_ASSOCIATE_RQ:
        raise MalformedPDU(
            f"A-ASSOCIATE-RQ announces {length} bytes, more than the {MAX_ASSOCIATE_RQ} accepted"
        )
    return HEADER_LENGTH + length


def _items(data: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """The (type, start of value, end of value) of each item in ``data[start:end]``."""
    items = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise MalformedPDU(f"{what}: item header cut off at byte {pos}")
        item_type = data[pos]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        value = pos + 4
        if value + length > end:
            raise MalformedPDU(
                f"{what}: item 0x{item_type:02X} at byte {pos} needs {length} bytes, "
                f"only {end - value} left"
            )
        items.append((item_type, value, value + length))
        pos = value + length
    return items


def _ae_title(raw: bytes) -> str:
    return raw.decode("ascii", errors="replace").strip(" \x00")


def check_associate_rq(pdu: bytes) -> AssociateRequest:
    """Check a complete A-ASSOCIATE-RQ PDU (header included) and return its AE titles.

    Raises :class:`MalformedPDU` for anything pynetdicom would choke on or that no real
    sender sends: items that run past their parent, unknown item types, more presentation
    contexts than there are context IDs. pynetdicom's own decoder then gets the bytes, so
    what passes is also what it can decode.
    """
    total = check_first_header(pdu[:HEADER_LENGTH])
    if len(pdu) != total:
        raise MalformedPDU(f"A-ASSOCIATE-RQ announces {total} bytes but {len(pdu)} were given")
    data = bytes(pdu)
    start = HEADER_LENGTH + _FIXED_FIELDS
    counts = dict.fromkeys(_TOP_ITEMS, 0)
    for item_type, value, end in _items(data, start, total, "A-ASSOCIATE-RQ"):
        if item_type not in _TOP_ITEMS:
            raise MalformedPDU(
                f"A-ASSOCIATE-RQ: unknown item type 0x{item_type:02X}",
                ABORT_UNRECOGNIZED_PARAMETER,
            )
        counts[item_type] += 1
        if item_type == 0x20:
            if counts[0x20] > MAX_PRESENTATION_CONTEXTS:
                raise MalformedPDU(
                    f"A-ASSOCIATE-RQ proposes more than {MAX_PRESENTATION_CONTEXTS} "
                    "presentation contexts"
                )
            if end - value < 4:
                raise MalformedPDU("presentation context item shorter than its fixed fields")
            for sub_type, _, _ in _items(data, value + 4, end, "presentation context"):
                if sub_type not in _CONTEXT_SUB_ITEMS:
                    raise MalformedPDU(
                        f"presentation context: unknown sub-item type 0x{sub_type:02X}",
                        ABORT_UNRECOGNIZED_PARAMETER,
                    )
        elif item_type == 0x50:
            subs = _items(data, value, end, "user information")
            if len(subs) > MAX_USER_INFO_SUB_ITEMS:
                raise MalformedPDU(
                    f"user information item has {len(subs)} sub-items, more than the "
                    f"{MAX_USER_INFO_SUB_ITEMS} accepted"
                )
            for sub_type, _, _ in subs:
                if sub_type not in _USER_SUB_ITEMS:
                    raise MalformedPDU(
                        f"user information: unknown sub-item type 0x{sub_type:02X}",
                        ABORT_UNRECOGNIZED_PARAMETER,
                    )
    for item_type in (0x10, 0x50):
        if counts[item_type] > 1:
            what = _TOP_ITEMS[item_type]
            raise MalformedPDU(f"A-ASSOCIATE-RQ has {counts[item_type]} {what} items")
    _decodes(data)
    return AssociateRequest(
        calling_ae=_ae_title(data[26:42]),
        called_ae=_ae_title(data[10:26]),
        presentation_contexts=counts[0x20],
    )


def _decodes(data: bytes) -> None:
    """Raise :class:`MalformedPDU` unless pynetdicom can decode the request into a primitive."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises whatever its parsers raise
        raise MalformedPDU(f"A-ASSOCIATE-RQ cannot be decoded: {exc!r}"[:300]) from exc


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason`` (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, diagnostic)


#: Rejected-transient, service provider (presentation), local limit exceeded: "try later".
REJECT_LOCAL_LIMIT = reject_pdu(0x02, 0x03, 0x02)
