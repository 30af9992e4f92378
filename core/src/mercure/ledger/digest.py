"""Per-instance identity for the ledger: the SOP Instance UID and a SHA-256 of the file.

Computed once per file: jobs of one series share their instances as hard links, so the same
inode delivered to three targets is read and hashed once (a small cache keyed by device,
inode, size and modification time). The UID comes from the file meta information, the
digest from every byte of the file as it was handed to the target.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble

ALGORITHM = "sha256"
CACHE_SIZE = 50_000
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class InstanceDigest:
    file: str
    sop_instance_uid: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "sop_instance_uid": self.sop_instance_uid,
            "digest": self.digest,
            "size": self.size,
        }


_cache: OrderedDict[tuple[int, int, int, int], tuple[str, str]] = OrderedDict()
_lock = threading.Lock()


def file_digest(path: Path) -> InstanceDigest:
    """UID and digest of one instance file; ``OSError`` if it cannot be read.

    A file that is not DICOM Part 10 gets an empty UID but still its digest.
    """
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
        if hit is not None:
            return InstanceDigest(path.name, hit[0], hit[1], st.st_size)
        h = hashlib.sha256()
        head = fh.read(_CHUNK)
        h.update(head)
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    uid = _meta_uid(head)
    digest = f"{ALGORITHM}:{h.hexdigest()}"
    with _lock:
        _cache[key] = (uid, digest)
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return InstanceDigest(path.name, uid, digest, st.st_size)


def _meta_uid(head: bytes) -> str:
    """MediaStorageSOPInstanceUID from the first bytes of a file ("" when there is none)."""
    try:
        buffer = BytesIO(head)
        read_preamble(buffer, False)
        meta = _read_file_meta_info(buffer)
        return str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except Exception:
        return ""


def digests(paths: list[Path]) -> list[InstanceDigest]:
    """Digests of the files that can be read (one that vanished is left out)."""
    found = []
    for path in paths:
        try:
            found.append(file_digest(path))
        except OSError:
            continue
    return found


__all__ = ["ALGORITHM", "InstanceDigest", "digests", "file_digest"]
