"""multipart/related bodies: a STOW-RS request streamed from files, a WADO-RS answer read back.

The request body is never held in memory: :class:`StowBody` yields each part's headers and
then the instance file in chunks, read from disk as httpx sends it, and knows its exact length
beforehand (so the request carries a ``Content-Length`` and works with servers that refuse
chunked uploads). It can be iterated again (httpx may resend a request), and it refuses to
send a file whose size changed since the batch was planned, so the length always holds.

:func:`first_part_to` reads the first part of a multipart answer (WADO-RS returns one part
for one instance) into a file-like sink chunk by chunk, for the same reason.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

CHUNK = 256 * 1024
CRLF = b"\r\n"


class BodyChanged(OSError):
    """A file changed or vanished between planning a request and sending it."""


@dataclass(frozen=True)
class Part:
    """One instance file to send, and its size when the request was planned."""

    path: Path
    size: int


def new_boundary() -> str:
    """A boundary that cannot occur in a DICOM file by chance (random, 32 hex digits)."""
    return f"mercure-{secrets.token_hex(16)}"


class StowBody(httpx.SyncByteStream):
    """The ``multipart/related; type="application/dicom"`` body of one STOW-RS request."""

    def __init__(self, parts: Iterable[Part], boundary: str | None = None) -> None:
        self.parts = list(parts)
        self.boundary = boundary or new_boundary()
        self._heads = [self._head(p) for p in self.parts]
        self._tail = b"--" + self.boundary.encode() + b"--" + CRLF

    def _head(self, part: Part) -> bytes:
        # Each part is the file as stored: DICOM Part 10, preamble and file meta included, so
        # the server reads the transfer syntax from the file meta and nothing is converted.
        # No transfer-syntax parameter on the media type: servers such as Orthanc refuse a
        # part whose type is not exactly "application/dicom".
        return (
            b"--"
            + self.boundary.encode()
            + CRLF
            + b"Content-Type: application/dicom"
            + CRLF
            + b"Content-Length: "
            + str(part.size).encode()
            + CRLF
            + CRLF
        )

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return (
            sum(len(h) for h in self._heads)
            + sum(p.size + len(CRLF) for p in self.parts)
            + len(self._tail)
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(len(self))}

    def __iter__(self) -> Iterator[bytes]:
        for head, part in zip(self._heads, self.parts, strict=True):
            yield head
            sent = 0
            try:
                with open(part.path, "rb") as fh:
                    while chunk := fh.read(min(CHUNK, part.size - sent + 1)):
                        sent += len(chunk)
                        if sent > part.size:
                            break
                        yield chunk
            except OSError as exc:
                raise BodyChanged(f"cannot read {part.path.name} while sending it: {exc}") from exc
            if sent != part.size:
                raise BodyChanged(
                    f"{part.path.name} changed while it was being sent ({part.size} bytes "
                    "planned); it is not sent"
                )
            yield CRLF
        yield self._tail


def boundary_of(content_type: str) -> str | None:
    """The ``boundary`` parameter of a multipart media type."""
    match = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not match:
        return None
    return match.group(1) or match.group(2)


class MultipartError(ValueError):
    """An answer that is not the multipart message it claims to be."""


def first_part_to(chunks: Iterable[bytes], boundary: str, sink: IO[bytes]) -> int:
    """Copy the body of the first part of a multipart message into ``sink``; return its size.

    Streams: at most one chunk plus the delimiter's length is held at a time.
    """
    opening = b"--" + boundary.encode()
    delimiter = CRLF + opening
    buffer = b""
    state = "preamble"
    written = 0
    for chunk in chunks:
        buffer += chunk
        if state == "preamble":
            at = buffer.find(opening)
            if at < 0:
                buffer = buffer[-len(opening) :]
                continue
            buffer = buffer[at + len(opening) :]
            state = "headers"
        if state == "headers":
            end = buffer.find(CRLF + CRLF)
            if end < 0:
                if len(buffer) > 64 * 1024:
                    raise MultipartError("part headers longer than 64 KiB")
                continue
            buffer = buffer[end + 4 :]
            state = "body"
        if state == "body":
            at = buffer.find(delimiter)
            if at >= 0:
                sink.write(buffer[:at])
                return written + at
            keep = len(delimiter) - 1
            if len(buffer) > keep:
                sink.write(buffer[:-keep])
                written += len(buffer) - keep
                buffer = buffer[-keep:]
    raise MultipartError("the multipart answer ended before its first part did")
