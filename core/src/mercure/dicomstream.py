"""A cheap structural check of an encoded DICOM dataset: is every element complete?

A sender that dies or misbehaves can deliver a dataset cut off in the middle of an element.
Parsing up to the pixel data would not notice, so the receiver walks the element headers (no
values are decoded) and checks that they end exactly where the stream ends. Sequences of
undefined length are walked into, at most :data:`MAX_NESTING` deep: a hostile dataset of
thousands of nested sequences is refused instead of exhausting the stack.
"""

from __future__ import annotations

import struct

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
#: Deeper nesting of undefined-length sequences and items than any real dataset has.
MAX_NESTING = 128


class TruncatedDatasetError(ValueError):
    """The dataset ends inside an element, an element runs past its end, or it nests deeper
    than :data:`MAX_NESTING`."""


def check_dataset(stream: bytes | memoryview, transfer_syntax: str) -> None:
    """Raise :class:`TruncatedDatasetError` unless ``stream`` is a complete encoded dataset."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # compressed stream; pydicom's inflate detects truncation when it is read
    data = memoryview(stream)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    end = _walk(data, 0, len(data), implicit, endian, stop_at=None, depth=0)
    if end != len(data):
        raise TruncatedDatasetError(f"dataset ends at byte {end} of {len(data)}")


def _walk(
    data: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    endian: str,
    stop_at: int | None,
    depth: int,
) -> int:
    """Walk elements from ``pos``; return the offset after the last one (or the delimiter)."""
    if depth > MAX_NESTING:
        raise TruncatedDatasetError(
            f"sequences nested deeper than {MAX_NESTING} levels at byte {pos}"
        )
    u16 = struct.Struct(endian + "H")
    u32 = struct.Struct(endian + "I")
    while pos < end:
        tag, length, value = _element_header(data, pos, end, implicit, u16, u32)
        if tag in (_ITEM_DELIM, _SEQ_DELIM):
            if stop_at is not None and tag == stop_at:
                return pos + 8
            raise TruncatedDatasetError(f"unexpected delimiter at byte {pos}")
        pos = value
        group, elem = tag >> 16, tag & 0xFFFF
        if length == _UNDEFINED:
            pos = _walk_undefined(data, pos, end, implicit, endian, depth)
            continue
        if pos + length > end:
            raise TruncatedDatasetError(
                f"element ({group:04X},{elem:04X}) needs {length} bytes at byte {pos}, "
                f"only {end - pos} left"
            )
        pos += length
    return pos


def _element_header(
    data: memoryview, pos: int, end: int, implicit: bool, u16: struct.Struct, u32: struct.Struct
) -> tuple[int, int, int]:
    """The tag, value length and value offset of the element whose header starts at ``pos``."""
    if pos + 8 > end:
        raise TruncatedDatasetError(f"element header cut off at byte {pos}")
    group, elem = u16.unpack_from(data, pos)[0], u16.unpack_from(data, pos + 2)[0]
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, u32.unpack_from(data, pos + 4)[0], pos + 8
    if bytes(data[pos + 4 : pos + 6]) in _LONG_VRS:
        if pos + 12 > end:
            raise TruncatedDatasetError(f"element header cut off at byte {pos}")
        return tag, u32.unpack_from(data, pos + 8)[0], pos + 12
    return tag, u16.unpack_from(data, pos + 6)[0], pos + 8


def _walk_undefined(
    data: memoryview, pos: int, end: int, implicit: bool, endian: str, depth: int
) -> int:
    """Skip a sequence or encapsulated pixel data of undefined length."""
    u32 = struct.Struct(endian + "I")
    u16 = struct.Struct(endian + "H")
    while True:
        if pos + 8 > end:
            raise TruncatedDatasetError(f"undefined-length element cut off at byte {pos}")
        group, elem = u16.unpack_from(data, pos)[0], u16.unpack_from(data, pos + 2)[0]
        item_tag = (group << 16) | elem
        length = u32.unpack_from(data, pos + 4)[0]
        pos += 8
        if item_tag == _SEQ_DELIM:
            return pos
        if item_tag != _ITEM:
            raise TruncatedDatasetError(f"expected an item at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(data, pos, end, implicit, endian, stop_at=_ITEM_DELIM, depth=depth + 1)
        else:
            if pos + length > end:
                raise TruncatedDatasetError(f"item of {length} bytes cut off at byte {pos}")
            pos += length


def top_level_value(stream: bytes | memoryview, transfer_syntax: str, tag: int) -> bytes | None:
    """The raw value of a top-level element, found by walking element headers only.

    Elements are in ascending tag order, so the walk stops at the first tag past ``tag``.
    None when it is absent, the syntax is deflated, or the headers do not add up (the
    caller then parses the dataset properly).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return None
    data = memoryview(stream)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    u16 = struct.Struct(endian + "H")
    u32 = struct.Struct(endian + "I")
    pos, end = 0, len(data)
    try:
        while pos + 8 <= end:
            current, length, pos = _element_header(data, pos, end, implicit, u16, u32)
            if current > tag:
                return None
            if length == _UNDEFINED:
                pos = _walk_undefined(data, pos, end, implicit, endian, 0)
                continue
            if current == tag:
                return bytes(data[pos : pos + length]) if pos + length <= end else None
            pos += length
    except (TruncatedDatasetError, struct.error):
        return None
    return None
