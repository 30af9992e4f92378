"""Durable file operations: every state change is an atomic rename or an atomic write.

A file is written under a temporary name in the same folder, fsynced, renamed to its final
name, and the folder is fsynced, so a crash leaves either the old or the new content, never
half a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(final: Path) -> Path:
    """A hidden, unique temporary name beside ``final`` (scanners skip dot-files)."""
    return final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{final.name}")


def atomic_write_bytes(path: Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing."""
    tmp = tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, fsync: bool = True) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode("utf-8"), fsync=fsync)


def durable_rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (which must not exist for folders) and fsync both parents."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``; copy when the two are on different filesystems.

    A hard link shares the instance between jobs without copying it; the copy fallback keeps
    spool folders on separate mounts working.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        tmp = tmp_name(dst)
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it; a missing folder is not an error."""
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if isinstance(exc_info[1], FileNotFoundError):
        return
    raise exc_info[1]


def safe_component(value: str, *, max_len: int = 128) -> str:
    """Turn a DICOM UID (or any text) into a single, harmless path component.

    UIDs are digits and dots by the standard, but a sender controls them; anything else
    (``../``, slashes, NUL, leading dots) is replaced so that it can never leave its folder.
    """
    cleaned = "".join(c if (c.isalnum() and c.isascii()) or c in ".-_" else "_" for c in value)
    cleaned = cleaned.lstrip(".") or "_"
    if len(cleaned) > max_len:
        cleaned = cleaned[:max_len]
    return cleaned


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    if not value or len(value) > 64:
        return False
    parts = value.split(".")
    return all(p.isdigit() and p.isascii() and (p == "0" or not p.startswith("0")) for p in parts)
