"""The ledger queue: an append-only journal of events on the spool, read by durable cursors.

Layout (under the ledger folder, ``ledger/`` beside ``outgoing/`` by default)::

    queue/.lock                  flock'ed while a record is appended or a segment rotated
    queue/queue-id               this queue's identity (a database keeps one cursor per queue)
    queue/<segment>.log          records, one line each: ``<crc32 hex> <json>\\n``
    queue/cursors/<reader>.json  how far each reader got (segment, offset)

Appending is one ``write`` of one line under an exclusive ``flock`` (so every process on the
spool appends in one global order), then ``fdatasync``: an event is durable before
:meth:`EventQueue.append` returns, and the pipeline never waits for a database. A record torn
by a crash mid-write is closed with a newline by the next writer and skipped by readers (its
checksum fails). Segments roll over at :data:`SEGMENT_BYTES`; a segment every reader has
passed is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercure.fsutil import atomic_write_json, fsync_dir, safe_component
from mercure.logs import get_logger

log = get_logger("mercure.ledger")

SEGMENT_BYTES = 8 * 1024 * 1024
SUFFIX = ".log"
READ_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, order=True)
class Position:
    """A place in the queue: the byte ``offset`` in segment number ``segment``."""

    segment: int
    offset: int

    def to_json(self) -> dict[str, int]:
        return {"segment": self.segment, "offset": self.offset}


@dataclass(frozen=True)
class QueuedRecord:
    """One record read from the queue and the position just after it."""

    data: dict[str, Any]
    end: Position


def _segment_name(number: int) -> str:
    return f"{number:020d}{SUFFIX}"


def encode_record(data: dict[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":"), default=str, ensure_ascii=False).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line, or None if it is torn or damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class EventQueue:
    """Append records durably; read them in order from a position."""

    def __init__(self, folder: Path, *, fsync: bool = True, segment_bytes: int = SEGMENT_BYTES):
        self.folder = folder
        self.cursors = folder / "cursors"
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.cursors.mkdir(parents=True, exist_ok=True)
        self._lock_path = folder / ".lock"
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment = 0
        self.queue_id = self._identity()

    def _identity(self) -> str:
        path = self.folder / "queue-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        new = uuid.uuid4().hex
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, new.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.folder)
        return path.read_text().strip()

    # -- segments ----------------------------------------------------------------------------

    def segments(self) -> list[int]:
        """The numbers of the segments present, in order."""
        found = []
        with os.scandir(self.folder) as entries:
            for e in entries:
                if e.name.endswith(SUFFIX) and e.name[: -len(SUFFIX)].isdigit():
                    found.append(int(e.name[: -len(SUFFIX)]))
        return sorted(found)

    def segment_path(self, number: int) -> Path:
        return self.folder / _segment_name(number)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This thread holds the queue's lock, across threads and processes."""
        with self._thread_lock:
            if self._lock_fd is None:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _writable(self) -> int:
        """The descriptor of the segment to append to (called with the lock held).

        A segment only grows, so a full one stays full. The newest segment is never deleted
        (no reader can be past it), so a new one is always numbered after the newest present.
        """
        if self._fd is not None and os.fstat(self._fd).st_size < self.segment_bytes:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        present = self.segments()
        number = present[-1] if present else 1
        path = self.segment_path(number)
        if present and path.stat().st_size >= self.segment_bytes:
            number += 1
            path = self.segment_path(number)
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        if created and self.fsync:
            fsync_dir(self.folder)
        self._segment = number
        return self._fd

    def append(self, data: dict[str, Any]) -> Position:
        """Append one record durably; returns the position after it. Raises ``OSError``."""
        line = encode_record(data)
        with self._locked():
            fd = self._writable()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # close a record torn by a crash; readers skip it
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            end = Position(self._segment, size + len(line))
        if self.fsync:
            os.fdatasync(fd)
        return end

    def close(self) -> None:
        with self._thread_lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = self._lock_fd = None

    # -- reading -----------------------------------------------------------------------------

    def start(self) -> Position:
        """The position of the oldest record still present."""
        present = self.segments()
        return Position(present[0] if present else 1, 0)

    def read(self, after: Position, limit: int = 500) -> tuple[list[QueuedRecord], Position]:
        """Up to ``limit`` records after ``after``, and the position to read from next.

        Moves to the next segment only once the current one is full and wholly read (checked
        under the lock, so no append is half done). A damaged line is skipped with a warning.
        """
        found: list[QueuedRecord] = []
        position = after
        present = self.segments()
        if present and position.segment < present[0]:
            log.warning(
                "ledger queue: records before the oldest segment are gone",
                position=position.to_json(),
                oldest=present[0],
            )
            position = Position(present[0], 0)
        while len(found) < limit:
            path = self.segment_path(position.segment)
            try:
                with open(path, "rb") as fh:
                    fh.seek(position.offset)
                    chunk = fh.read(READ_CHUNK)
            except FileNotFoundError:
                chunk = b""
            consumed = 0
            while len(found) < limit:
                end = chunk.find(b"\n", consumed)
                if end < 0:
                    break
                line = chunk[consumed:end]
                at = position.offset + consumed
                consumed = end + 1
                if not line:
                    continue  # the newline that closed a torn record
                data = decode_line(line)
                if data is None:
                    log.warning(
                        "ledger queue: a damaged record was skipped (torn by a crash)",
                        segment=position.segment,
                        offset=at,
                    )
                    continue
                found.append(
                    QueuedRecord(data, Position(position.segment, position.offset + consumed))
                )
            full_chunk = len(chunk) == READ_CHUNK
            if consumed == 0 and full_chunk:
                raise ValueError(
                    f"ledger queue segment {path} holds a record larger than {READ_CHUNK} "
                    f"bytes at offset {position.offset}"
                )
            position = Position(position.segment, position.offset + consumed)
            if len(found) >= limit:
                break
            if full_chunk:
                continue
            following = self._next_segment(position)
            if following is None:
                break
            position = following
        return found, position

    def _next_segment(self, position: Position) -> Position | None:
        """Where to read after ``position``, the end of what is in its segment; None: stay.

        A segment is left once it is full and a later one exists. Bytes after the last
        complete record of a full segment are a record torn by a crash: nothing will ever
        complete it, so it is skipped.
        """
        later = [n for n in self.segments() if n > position.segment]
        if not later:
            return None
        path = self.segment_path(position.segment)
        with self._locked():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return Position(later[0], 0)
            if size < self.segment_bytes:
                return None
            if size > position.offset:
                with open(path, "rb") as fh:
                    fh.seek(position.offset)
                    rest = fh.read()
                if b"\n" in rest:
                    return None  # complete records appended meanwhile: read them first
                log.warning(
                    "ledger queue: a record torn by a crash was skipped",
                    segment=position.segment,
                    offset=position.offset,
                )
        return Position(later[0], 0)

    # -- cursors -----------------------------------------------------------------------------

    def cursor(self, reader: str) -> Position | None:
        path = self.cursors / f"{safe_component(reader)}.json"
        try:
            data = json.loads(path.read_text())
            return Position(int(data["segment"]), int(data["offset"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("ledger queue: unreadable cursor, reading from the start", reader=reader)
            return None

    def save_cursor(self, reader: str, position: Position) -> None:
        path = self.cursors / f"{safe_component(reader)}.json"
        atomic_write_json(path, {**position.to_json(), "at": time.time()}, fsync=self.fsync)

    def readers(self) -> list[str]:
        return sorted(p.stem for p in self.cursors.glob("*.json"))

    def drop_reader(self, reader: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.cursors / f"{safe_component(reader)}.json").unlink()

    def trim(self, readers: list[str]) -> int:
        """Delete segments that every reader in ``readers`` has passed; returns how many.

        A reader without a cursor yet holds every segment. The newest segment always stays.
        """
        if not readers:
            return 0
        positions = [self.cursor(r) for r in readers]
        if any(p is None for p in positions):
            return 0
        lowest = min(p.segment for p in positions if p is not None)
        present = self.segments()
        removed = 0
        for number in present[:-1]:
            if number >= lowest:
                break
            with contextlib.suppress(FileNotFoundError):
                self.segment_path(number).unlink()
                removed += 1
        if removed and self.fsync:
            fsync_dir(self.folder)
        return removed

    def backlog(self, position: Position) -> int:
        """Bytes of records after ``position`` (how far a reader is behind)."""
        total = 0
        for number in self.segments():
            if number < position.segment:
                continue
            try:
                size = self.segment_path(number).stat().st_size
            except FileNotFoundError:
                continue
            total += size - (position.offset if number == position.segment else 0)
        return max(total, 0)


__all__ = ["EventQueue", "Position", "QueuedRecord", "decode_line", "encode_record"]
