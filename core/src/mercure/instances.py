"""The instances of a job: which file holds which SOP instance, read from the files themselves.

Every target reports delivery per file name, while peers answer per SOP Instance UID (a
STOW-RS response, a C-STORE status, an object key). :class:`InstanceIndex` maps between the two
from each file's DICOM file meta information (the header only, never the pixel data), once per
file, and reads further header tags on demand for key patterns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from mercure.tags import tags_from_dataset


@dataclass(frozen=True)
class InstanceInfo:
    """What the file meta information says about one instance file."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def read_instance(path: Path) -> InstanceInfo:
    """Read a file's meta information; ``ValueError`` says why the file cannot be used."""
    try:
        meta = read_file_meta_info(path)
        size = path.stat().st_size
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path.name} as a DICOM file: {exc}") from exc
    except Exception as exc:  # a damaged header must fail this file, not the whole job
        raise ValueError(
            f"cannot read the file meta information of {path.name}: {exc.__class__.__name__}: {exc}"
        ) from exc
    missing = [
        kw
        for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
        if not meta.get(kw)
    ]
    if missing:
        raise ValueError(
            f"{path.name} has no {', '.join(missing)} in its file meta information; it is not a "
            "DICOM Part 10 file"
        )
    return InstanceInfo(
        path,
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        size,
    )


def read_header_tags(path: Path, keywords: Iterable[str] = ()) -> dict[str, str]:
    """The routing tags (plus ``keywords``) of one file, without reading its pixel data."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    return tags_from_dataset(ds, keywords)


class InstanceIndex:
    """File name ↔ SOP Instance UID for the files of one job; safe to share between threads.

    Files that cannot be read are kept in :attr:`unreadable` with the reason, so a target can
    report them as failed (they will never succeed) instead of failing the whole job.
    """

    def __init__(self, files: Iterable[Path] = ()) -> None:
        self._by_name: dict[str, InstanceInfo] = {}
        self._by_uid: dict[str, InstanceInfo] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self.unreadable: dict[str, str] = {}
        self._lock = threading.Lock()
        self.add(files)

    def add(self, files: Iterable[Path]) -> list[InstanceInfo]:
        """Index more files (a streaming job's later arrivals); returns the readable new ones."""
        added: list[InstanceInfo] = []
        for path in files:
            with self._lock:
                if path.name in self._by_name or path.name in self.unreadable:
                    continue
            try:
                info = read_instance(path)
            except ValueError as exc:
                with self._lock:
                    self.unreadable[path.name] = str(exc)
                continue
            with self._lock:
                self._by_name[path.name] = info
                self._by_uid.setdefault(info.sop_instance_uid, info)
            added.append(info)
        return added

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[InstanceInfo]:
        return iter(list(self._by_name.values()))

    def by_name(self, name: str) -> InstanceInfo | None:
        return self._by_name.get(name)

    def by_uid(self, sop_instance_uid: str) -> InstanceInfo | None:
        return self._by_uid.get(sop_instance_uid)

    def names_for(self, uids: Iterable[str]) -> list[str]:
        """The file names holding ``uids`` (UIDs not in this job are left out)."""
        return [info.name for uid in uids if (info := self._by_uid.get(uid)) is not None]

    def tags(self, name: str, keywords: Iterable[str] = ()) -> Mapping[str, str]:
        """Header tags of one file (cached): for per-instance key patterns."""
        with self._lock:
            cached = self._tags.get(name)
        if cached is not None and all(k in cached for k in keywords):
            return cached
        info = self._by_name.get(name)
        if info is None:
            raise KeyError(f"{name} is not an indexed instance of this job")
        tags = read_header_tags(info.path, keywords)
        with self._lock:
            self._tags[name] = tags
        return tags


__all__ = ["InstanceIndex", "InstanceInfo", "read_header_tags", "read_instance"]
