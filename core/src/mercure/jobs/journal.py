"""The receive journal: an instance is durable after one write and one ``fdatasync``.

Answering a C-STORE only once its instance is durable costs, with a file per instance, a
``fdatasync`` of the file and an ``fsync`` of its folder: two journal commits of the file
system, about 2 ms per instance on a virtual disk, longer than DCMTK takes to receive it.
DIMSE is one request at a time per association, so nothing overlaps that wait.

The journal is a few segment files allocated in advance. A received instance (its routing
tags and its Part 10 bytes) is written as one record at the segment's next free offset and
``fdatasync``-ed: on space already allocated that is one flush and no metadata. Then the
receiver answers Success. A thread of the journal (the *materializer*) takes the journaled
instances in batches, writes them as files into the spool's temporary folder, makes the whole
batch durable with one ``syncfs``, renames them into their series folders, makes that durable
with a second ``syncfs``, and only then records in the segment header how far the segment
is materialized (its *checkpoint*). Routers only ever see durable files.

After a crash, :meth:`ReceiveJournal.recover` stores every valid record past each segment's
checkpoint into the spool, the slow durable way, before the receiver accepts anything. A
record whose write did not complete was never answered and fails its CRC; a record of an
earlier use of the segment has another generation. An instance that was materialized just
before the crash, but not yet checkpointed, is stored once more: the sender's instance is
delivered twice rather than lost.

``MERCURE_RECEIVE_JOURNAL=1`` turns the journal on; without it every instance is a file and
two syncs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mercure.fsutil import fsync_dir
from mercure.jobs.incoming import IncomingSpool
from mercure.logs import get_logger

log = get_logger("mercure.receiver")

JOURNAL_ENV = "MERCURE_RECEIVE_JOURNAL"
JOURNAL_FOLDER = ".journal"
SEGMENT_MAGIC = b"MRJSEG01"
RECORD_MAGIC = b"MRJR"
#: Segment header: magic, generation, checkpoint, CRC of the three.
_SEGMENT_HEADER = struct.Struct(">8sQQI")
#: Record header: magic, generation, payload length, payload CRC, lengths of series UID,
#: SOP instance UID and tags, and a CRC of the header itself.
_RECORD_HEADER = struct.Struct(">4sQIIHHII")
ALIGN = 4096
SEGMENT_BYTES = 32 << 20
SEGMENTS = 4
#: The materializer takes up to this many instances per batch (two syncs per batch).
BATCH = 256


def journal_enabled() -> bool:
    """Whether receivers write through the journal (``MERCURE_RECEIVE_JOURNAL=1``).

    Off by default for now: its segments take 128 MiB of the spool's file system up front,
    which on a small spool leaves the router no room for its jobs when the disk fills.
    """
    return os.environ.get(JOURNAL_ENV, "0").strip() in ("1", "true", "yes", "on")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


def _syncfs(fd: int, fallback: Iterable[int]) -> None:
    """Flush the file system of ``fd`` (Linux ``syncfs``); else ``fdatasync`` every file."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is not None and syncfs(fd) == 0:
        return
    for other in fallback:
        os.fdatasync(other)


@dataclass(eq=False)
class _Segment:
    path: Path
    fd: int
    generation: int = 0
    checkpoint: int = ALIGN
    next_offset: int = ALIGN
    #: Offsets of records written, in offset order, and those materialized since.
    reserved: list[tuple[int, int]] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    closed: bool = False

    def write_header(self) -> None:
        body = SEGMENT_MAGIC, self.generation, self.checkpoint
        crc = zlib.crc32(struct.pack(">8sQQ", *body))
        os.pwrite(self.fd, _SEGMENT_HEADER.pack(*body, crc), 0)
        os.fdatasync(self.fd)

    def read_header(self) -> bool:
        raw = os.pread(self.fd, _SEGMENT_HEADER.size, 0)
        if len(raw) < _SEGMENT_HEADER.size:
            return False
        magic, generation, checkpoint, crc = _SEGMENT_HEADER.unpack(raw)
        if magic != SEGMENT_MAGIC or zlib.crc32(raw[:-4]) != crc:
            return False
        self.generation, self.checkpoint = generation, checkpoint
        return True

    def advance(self) -> bool:
        """Move the checkpoint over the records materialized in a row; True if it moved."""
        moved = False
        while self.reserved and self.reserved[0][0] in self.done:
            offset, end = self.reserved.pop(0)
            self.done.discard(offset)
            self.checkpoint = end
            moved = True
        return moved


@dataclass(frozen=True)
class _Entry:
    """A journaled instance waiting for the materializer."""

    segment: _Segment
    offset: int
    skip: int  # bytes before the instance's data (record header and names)
    size: int
    series_uid: str
    sop_uid: str
    tags: dict[str, str]


@dataclass(frozen=True)
class Record:
    """A journaled instance read back (recovery)."""

    series_uid: str
    sop_uid: str
    tags: dict[str, str]
    data: bytes
    end: int


def _names(series_uid: str, sop_uid: str, tags: Mapping[str, str]) -> tuple[bytes, int, int]:
    """The series UID, SOP instance UID and tags of a record, and the two UIDs' lengths."""
    series, sop = series_uid.encode(), sop_uid.encode()
    tag_bytes = json.dumps(dict(tags), ensure_ascii=False).encode("utf-8")
    return series + sop + tag_bytes, len(series), len(sop)


def _header(generation: int, names: bytes, n_series: int, n_sop: int, size: int, crc: int) -> bytes:
    n_tags = len(names) - n_series - n_sop
    fields = (RECORD_MAGIC, generation, size, zlib.crc32(names, crc), n_series, n_sop, n_tags)
    header_crc = zlib.crc32(struct.pack(">4sQIIHHI", *fields))
    return _RECORD_HEADER.pack(*fields, header_crc)


def read_record(fd: int, offset: int, generation: int, limit: int) -> Record | None:
    """The valid record of ``generation`` at ``offset``, or None."""
    raw = os.pread(fd, _RECORD_HEADER.size, offset)
    if len(raw) < _RECORD_HEADER.size or raw[:4] != RECORD_MAGIC:
        return None
    _magic, gen, size, crc, n_series, n_sop, n_tags, header_crc = _RECORD_HEADER.unpack(raw)
    if gen != generation or zlib.crc32(raw[:-4]) != header_crc:
        return None
    names_len = n_series + n_sop + n_tags
    end = offset + _RECORD_HEADER.size + names_len + size
    if end > limit:
        return None
    body = os.pread(fd, names_len + size, offset + _RECORD_HEADER.size)
    names, data = body[:names_len], body[names_len:]
    if zlib.crc32(names, zlib.crc32(data)) != crc:
        return None
    try:
        tags = json.loads(names[n_series + n_sop :])
        series_uid = names[:n_series].decode()
        sop_uid = names[n_series : n_series + n_sop].decode()
    except ValueError:
        return None
    return Record(series_uid, sop_uid, tags, data, _align(end))


def scan(fd: int, generation: int, start: int, limit: int) -> Iterable[Record]:
    """Every valid record from ``start`` on; skips the gaps left by writes that never ended."""
    offset = start
    while offset + _RECORD_HEADER.size <= limit:
        record = read_record(fd, offset, generation, limit)
        if record is None:
            offset += ALIGN
            continue
        yield record
        offset = record.end


class ReceiveJournal:
    """The journal of one receiver process, in ``incoming/.journal/<owner>``."""

    def __init__(
        self,
        spool: IncomingSpool,
        owner: str = "main",
        *,
        segments: int = SEGMENTS,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.spool = spool
        self.folder = spool.folder / JOURNAL_FOLDER / owner
        self.segment_bytes = segment_bytes
        self.segment_count = segments
        self._segments: list[_Segment] = []
        self._free: deque[_Segment] = deque()
        self._current: _Segment | None = None
        self._lock = threading.Lock()
        self._queue: deque[_Entry] = deque()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        #: Instances stored without the journal because every segment was in use.
        self.bypassed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> int:
        """Recover what a previous run left, prepare the segments, start the materializer.

        Returns the number of instances recovered.
        """
        recovered = recover_folder(self.spool, self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(self.segment_count):
            path = self.folder / f"segment-{i}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size < self.segment_bytes:
                with contextlib.suppress(OSError):  # not every file system can
                    os.posix_fallocate(fd, 0, self.segment_bytes)
                if os.fstat(fd).st_size < self.segment_bytes:
                    os.ftruncate(fd, self.segment_bytes)
            segment = _Segment(path, fd)
            segment.read_header()
            segment.generation += 1
            segment.checkpoint = segment.next_offset = ALIGN
            segment.write_header()
            self._segments.append(segment)
            self._free.append(segment)
        fsync_dir(self.folder)
        self._thread = threading.Thread(target=self._run, name="receive-journal", daemon=True)
        self._thread.start()
        return recovered

    def close(self) -> None:
        """Materialize what is journaled, then stop."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(60)
        for segment in self._segments:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self._segments.clear()

    # -- receivers ---------------------------------------------------------------------------

    def store(
        self,
        series_uid: str,
        sop_uid: str,
        chunks: list[bytes | memoryview],
        tags: Mapping[str, str],
    ) -> None:
        """Make one instance durable; it reaches its series folder shortly after.

        Raises ``OSError`` like :meth:`IncomingSpool.store` when it cannot be kept.
        """
        size = sum(len(c) for c in chunks)
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        names, n_series, n_sop = _names(series_uid, sop_uid, tags)
        length = _RECORD_HEADER.size + len(names) + size
        with self._lock:
            reserved = self._reserve(length)
            if reserved is None:
                self.bypassed += 1
        if reserved is None:
            self.spool.store(series_uid, sop_uid, chunks, tags)
            return
        segment, offset = reserved
        header = _header(segment.generation, names, n_series, n_sop, size, crc)
        try:
            written = os.pwritev(segment.fd, [header, names, *chunks], offset)
            if written != length:
                raise OSError(f"journal write of {length} bytes wrote {written}")
            os.fdatasync(segment.fd)
        except OSError:
            with self._lock:
                segment.done.add(offset)  # nothing to materialize: let the checkpoint pass it
            raise
        skip = _RECORD_HEADER.size + len(names)
        entry = _Entry(segment, offset, skip, size, series_uid, sop_uid, dict(tags))
        with self._lock:
            self._queue.append(entry)
            self._wake.notify()

    def _reserve(self, length: int) -> tuple[_Segment, int] | None:
        """The segment and offset to write ``length`` bytes at; None if none is free (locked)."""
        segment = self._current
        if segment is None or segment.next_offset + length > self.segment_bytes:
            if segment is not None:
                segment.closed = True
            if not self._free or length + ALIGN > self.segment_bytes:
                self._current = None
                return None
            segment = self._current = self._free.popleft()
            segment.closed = False
        offset = segment.next_offset
        segment.next_offset = _align(offset + length)
        segment.reserved.append((offset, segment.next_offset))
        return segment, offset

    # -- the materializer --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._wake.wait(0.5)
                if not self._queue and self._stop:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            placed: list[_Entry] = []
            try:
                self._materialize(batch, placed)
                self._checkpoint(batch)
            except Exception as exc:
                if isinstance(exc, OSError):  # a full disk: the journal holds them meanwhile
                    log.warning(
                        "receive journal: cannot move instances into the spool; retrying",
                        error=str(exc),
                        instances=len(batch) - len(placed),
                    )
                else:
                    log.exception("receive journal: cannot move instances into the spool")
                left = [e for e in batch if e not in placed]
                with self._lock:
                    self._queue.extendleft(reversed(left))
                    stopping = self._stop
                with contextlib.suppress(Exception):
                    if placed:  # in their series folders: never place them twice
                        self._sync_folders({self.spool.folder})
                        self._checkpoint(placed)
                if stopping:
                    return  # durable in the journal: the next start recovers them
                time.sleep(1.0)

    def _materialize(self, batch: list[_Entry], placed: list[_Entry]) -> None:
        """Write a batch into the spool durably; ``placed`` lists those in series folders."""
        spool = self.spool
        written: list[tuple[_Entry, Path]] = []
        fds: list[int] = []
        try:
            for entry in batch:
                data = os.pread(entry.segment.fd, entry.size, entry.offset + entry.skip)
                fd, tmp = spool.open_tmp()
                fds.append(fd)
                written.append((entry, tmp))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            _syncfs(fds[0], fds)
        except BaseException:
            for _, tmp in written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        touched: set[Path] = set()
        for i, (entry, tmp) in enumerate(written):
            try:
                touched.add(
                    spool.place(entry.series_uid, entry.sop_uid, tmp, entry.tags, sync=False)
                )
                placed.append(entry)
            except BaseException:
                for _, later in written[i + 1 :]:
                    with contextlib.suppress(OSError):
                        os.unlink(later)
                raise
        self._sync_folders(touched)

    def _checkpoint(self, batch: list[_Entry]) -> None:
        """Record how far each segment is materialized; recycle the segments done with."""
        headers: list[tuple[_Segment, bool]] = []
        with self._lock:
            changed = set()
            for entry in batch:
                entry.segment.done.add(entry.offset)
                changed.add(entry.segment)
            for segment in changed:
                moved = segment.advance()
                recycle = segment.closed and not segment.reserved
                if recycle:
                    segment.generation += 1
                    segment.checkpoint = segment.next_offset = ALIGN
                    segment.closed = False
                if moved or recycle:
                    headers.append((segment, recycle))
        for segment, recycle in headers:
            segment.write_header()
            if recycle:
                with self._lock:
                    self._free.append(segment)

    def _sync_folders(self, files: set[Path]) -> None:
        """Make the renames of a batch durable: one ``syncfs``, else each folder's ``fsync``."""
        folders = {f.parent for f in files} | {self.spool.folder}
        fd = os.open(self.spool.folder, os.O_RDONLY)
        try:
            syncfs = getattr(_libc, "syncfs", None)
            if syncfs is not None and syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
        for folder in folders:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)


def recover_folder(spool: IncomingSpool, folder: Path) -> int:
    """Store the journaled instances past each segment's checkpoint into the spool."""
    if not folder.is_dir():
        return 0
    recovered = 0
    for path in sorted(folder.glob("segment-*")):
        fd = os.open(path, os.O_RDWR)
        try:
            segment = _Segment(path, fd)
            if not segment.read_header():
                continue
            limit = os.fstat(fd).st_size
            for record in scan(fd, segment.generation, segment.checkpoint, limit):
                spool.store(record.series_uid, record.sop_uid, [record.data], record.tags)
                recovered += 1
            segment.checkpoint = limit
            segment.generation += 1
            segment.write_header()
        finally:
            os.close(fd)
    if recovered:
        log.warning(
            "receive journal: instances recovered into the spool after an unclean stop",
            journal=str(folder),
            instances=recovered,
        )
    return recovered


def recover_all(spool: IncomingSpool) -> int:
    """Recover every receiver process's journal (before any of them starts)."""
    root = spool.folder / JOURNAL_FOLDER
    if not root.is_dir():
        return 0
    return sum(recover_folder(spool, p) for p in sorted(root.iterdir()) if p.is_dir())
