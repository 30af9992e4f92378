"""The incoming spool: where receivers put instances until the router takes whole series.

Layout::

    incoming/
      .tmp/                         instances being written (temporary names)
      <series>/                     one folder per series still arriving
        <sop-instance>.dcm          complete, fsynced instances
        series.tags                 routing tags of the series' first instance (JSON)
      .routing/<series>-<n>/        series taken by a router (claimed with a lock)

A series folder's modification time is the time its last instance arrived, so the router
finds complete series with one ``stat`` per series, never a scan per instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mercure.fsutil import TMP_PREFIX, fsync_dir, safe_component

TAGS_FILE = "series.tags"
PLAN_FILE = ".plan.json"
ROUTING = ".routing"
TMP = ".tmp"
DCM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class SeriesFolder:
    """A series in the incoming spool and when its last instance arrived."""

    path: Path
    last_change: float


class IncomingSpool:
    """Writes instances durably and hands complete series to routers."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = folder
        self.tmp = folder / TMP
        self.routing = folder / ROUTING
        self.fsync = fsync
        for path in (self.folder, self.tmp, self.routing):
            path.mkdir(parents=True, exist_ok=True)

    # -- receivers ---------------------------------------------------------------------------

    def store(
        self,
        series_uid: str,
        sop_uid: str,
        chunks: Iterator[bytes | memoryview] | list[bytes | memoryview],
        tags: Mapping[str, str],
    ) -> Path:
        """Write one instance durably into its series folder and return its final path.

        Raises ``OSError`` (disk full, permissions) with nothing left behind; the caller answers
        the sender with a failure status so that it retries.
        """
        fd, tmp = self.open_tmp()
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync:
                os.fdatasync(fd)  # data and size; the rename is made durable below
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return self.place(series_uid, sop_uid, tmp, tags)

    def has_series_tags(self, series_uid: str) -> bool:
        """Whether the series is arriving with its routing tags stored (later ones are unused)."""
        return os.path.exists(os.path.join(self.folder, safe_component(series_uid), TAGS_FILE))

    def open_tmp(self) -> tuple[int, Path]:
        """A new temporary file for an instance (its descriptor and path), to :meth:`place` later.

        A receiver that streams a large instance writes it here as it arrives; a receiver that
        dies meanwhile leaves only a temporary file, which :meth:`clean_tmp` removes.
        """
        tmp = self.tmp / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp

    def place(
        self,
        series_uid: str,
        sop_uid: str,
        tmp: Path,
        tags: Mapping[str, str],
        *,
        sync: bool = True,
    ) -> Path:
        """Move a complete temporary file (already ``fdatasync``-ed) into its series folder.

        The rename and the folder are made durable before this returns (unless ``sync`` is
        false: the receive journal syncs a whole batch at once); on ``OSError`` the temporary
        file is removed.
        """
        series_name = safe_component(series_uid)
        name = safe_component(sop_uid) + DCM_SUFFIX
        try:
            return self._place(series_name, name, tmp, tags, sync=sync and self.fsync)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _place(
        self, series_name: str, name: str, tmp: Path, tags: Mapping[str, str], *, sync: bool
    ) -> Path:
        # A router may take the series folder away at any moment; then start a new one.
        for _ in range(20):
            series_dir = self.folder / series_name
            created = False
            try:
                series_dir.mkdir()
                created = True
            except FileExistsError:
                pass
            try:
                if created or not (series_dir / TAGS_FILE).exists():
                    self._write_tags(series_dir, tags)
                os.rename(tmp, series_dir / name)
            except FileNotFoundError:
                continue
            if sync:
                try:
                    fsync_dir(series_dir)
                except FileNotFoundError:
                    # A router took the series just after the rename: the instance is in the
                    # taken folder and is routed with it. Make its entry durable there.
                    self._fsync_taken(series_name, name)
                if created:
                    fsync_dir(self.folder)
            return series_dir / name
        raise OSError(f"series folder {series_name} kept disappearing while storing {name}")

    def _fsync_taken(self, series_name: str, name: str) -> None:
        """fsync the taken folder of ``series_name`` that holds ``name`` (if still there).

        Once the router has removed it, its jobs (fsynced when created) hold the instance.
        """
        with os.scandir(self.routing) as entries:
            candidates = [e.path for e in entries if e.name.startswith(f"{series_name}-")]
        for path in candidates:
            if os.path.exists(os.path.join(path, name)):
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(path)

    def _write_tags(self, series_dir: Path, tags: Mapping[str, str]) -> None:
        tmp = self.tmp / f"{TMP_PREFIX}{uuid.uuid4().hex}.tags"
        data = json.dumps(dict(tags), ensure_ascii=False).encode("utf-8")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    os.fdatasync(fh.fileno())
            os.rename(tmp, series_dir / TAGS_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- routers -----------------------------------------------------------------------------

    def series(self) -> list[SeriesFolder]:
        """Series folders currently arriving, with the time of their last change."""
        found: list[SeriesFolder] = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        found.append(SeriesFolder(Path(entry.path), entry.stat().st_mtime))
                except FileNotFoundError:
                    continue
        return found

    def complete_series(self, quiet_seconds: float, now: float | None = None) -> list[SeriesFolder]:
        """Series with no new instance for ``quiet_seconds`` (mercure's series_complete_trigger)."""
        now = time.time() if now is None else now
        return [s for s in self.series() if now - s.last_change >= quiet_seconds]

    def take(self, series: Path) -> Path | None:
        """Move a series folder into ``.routing`` for a router; None if another took it first."""
        dest = self.routing / f"{series.name}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(series, dest)
        except FileNotFoundError:
            return None
        if self.fsync:
            fsync_dir(self.routing)
            fsync_dir(self.folder)
        return dest

    def taken(self) -> list[Path]:
        """Series folders in ``.routing`` (some may belong to a router that died)."""
        with os.scandir(self.routing) as entries:
            return sorted(Path(e.path) for e in entries if not e.name.startswith("."))

    def clean_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by a receiver that died while writing."""
        removed = 0
        limit = time.time() - older_than
        with os.scandir(self.tmp) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


def read_series_tags(series_dir: Path) -> dict[str, str] | None:
    """The routing tags stored with a series, or None if the file is missing or unreadable."""
    try:
        data = json.loads((series_dir / TAGS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else None


def instance_files(folder: Path) -> list[Path]:
    """The instance files of a series or job folder, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(
            Path(e.path)
            for e in entries
            if e.name.endswith(DCM_SUFFIX) and not e.name.startswith(".")
        )


def instance_names(folder: Path) -> set[str]:
    """The instance file names in a folder; cheaper than :func:`instance_files` for polling."""
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.name.endswith(DCM_SUFFIX) and e.name[0] != "."}


def read_plan(series_dir: Path) -> list[dict[str, object]] | None:
    """The routing plan stored with a series, or None if none was made yet."""
    try:
        data = json.loads((series_dir / PLAN_FILE).read_bytes())
    except FileNotFoundError:
        return None
    return data if isinstance(data, list) else None


def write_plan_once(
    series_dir: Path, plan: list[dict[str, object]], *, fsync: bool = True
) -> list[dict[str, object]] | None:
    """Store ``plan`` unless the series has one already; return the plan that holds.

    Creating the file with ``link`` is atomic and fails if it exists, so two routers that plan
    the same series at once agree on the first plan. None if the folder has gone (taken).
    """
    tmp = series_dir.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}.plan"
    try:
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(plan).encode("utf-8"))
            if fsync:
                os.fdatasync(fh.fileno())
        try:
            os.link(tmp, series_dir / PLAN_FILE)
        except FileExistsError:
            return read_plan(series_dir)
        except FileNotFoundError:
            return None
        if fsync:
            fsync_dir(series_dir)
        return plan
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
