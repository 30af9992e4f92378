"""Job folders and their states.

A job is a folder named by its task id holding the instance files and ``task.json``. Its state
is the spool folder it is in; it changes state by an atomic rename while claimed::

    outgoing/    waiting for the dispatcher (and being sent)
    processing/  waiting for a processing module
    success/     every target confirmed every instance
    error/       gave up after retry_max tries; task.json says why; kept until an operator acts
    discard/     matched no rule, or a rule discarded it; kept for the retention period

Jobs are built in a hidden staging folder (``<state>/.new-<id>``) and renamed into place, so a
job folder that is visible is always complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mercure.config import Config
from mercure.fsutil import durable_rename, fsync_dir, link_or_copy, remove_tree
from mercure.jobs.claims import Claim, try_claim
from mercure.jobs.task import TASKFILE, Task, read_task, write_task

State = Literal["outgoing", "processing", "success", "error", "discard"]
STATES: tuple[State, ...] = ("outgoing", "processing", "success", "error", "discard")
STAGING_PREFIX = ".new-"
OPEN_MARKER = ".open"
"""Present in a job whose series is still arriving; the router removes it when complete."""


@dataclass(frozen=True)
class JobRef:
    """A job folder and its state."""

    id: str
    state: State
    path: Path


class JobStore:
    """Creates jobs, finds them, and moves them between states."""

    def __init__(self, folders: dict[State, Path], *, fsync: bool = True) -> None:
        self.folders = folders
        self.fsync = fsync
        for path in folders.values():
            path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, config: Config, *, fsync: bool = True) -> JobStore:
        return cls({state: config.folder(state) for state in STATES}, fsync=fsync)

    # -- lookup ------------------------------------------------------------------------------

    def path(self, state: State, task_id: str) -> Path:
        return self.folders[state] / task_id

    def find(self, task_id: str) -> JobRef | None:
        """The job's current folder, or None. A unique prefix of the id is accepted."""
        for state in STATES:
            path = self.folders[state] / task_id
            if path.is_dir():
                return JobRef(task_id, state, path)
        matches = [ref for ref in self.list() if ref.id.startswith(task_id)]
        return matches[0] if len(matches) == 1 else None

    def exists(self, task_id: str) -> bool:
        return any((self.folders[state] / task_id).is_dir() for state in STATES)

    def list(self, states: Iterable[State] = STATES) -> list[JobRef]:
        refs: list[JobRef] = []
        for state in states:
            with os.scandir(self.folders[state]) as entries:
                refs.extend(
                    JobRef(e.name, state, Path(e.path))
                    for e in entries
                    if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                )
        return refs

    # -- creation ----------------------------------------------------------------------------

    def create(
        self, state: State, task: Task, files: Iterable[Path], *, open_job: bool = False
    ) -> JobRef:
        """Build a job from ``files`` (hard-linked) and ``task``; idempotent per task id.

        If the job already exists in any state nothing is done, so a router that crashed half
        way can run its plan again without creating a job twice.
        """
        existing = self.find_exact(task.id)
        if existing is not None:
            return existing
        staging = self._new_staging(state, task.id)
        building = try_claim(staging)  # keeps clean_staging() of other processes away
        if building is None:
            raise OSError(f"staging folder {staging} was taken away while it was being built")
        with building:
            for src in files:
                link_or_copy(src, staging / src.name)
            # The instances are links to files the receiver already made durable (a copy across
            # filesystems is synced by link_or_copy): only the task file and the folder need it.
            write_task(staging, task, fsync=False)
            if self.fsync:
                fd = os.open(staging / TASKFILE, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if open_job:
                (staging / OPEN_MARKER).touch()
            if self.fsync:
                fsync_dir(staging)
            final = self.folders[state] / task.id
            try:
                os.rename(staging, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process published this job first: keep theirs.
                remove_tree(staging)
                existing = self.find_exact(task.id)
                if existing is None:
                    raise
                return existing
            if self.fsync:
                fsync_dir(self.folders[state])
        return JobRef(task.id, state, final)

    def _new_staging(self, state: State, task_id: str) -> Path:
        """A staging folder of this builder's own.

        Two processes building the same job at once (routers streaming one arriving series)
        never write into each other's folder, and the rename in :meth:`create` lets exactly
        one of them publish the job. The leftover of a builder that died is reused.
        """
        base = self.folders[state] / f"{STAGING_PREFIX}{task_id}"
        with contextlib.suppress(FileExistsError):
            base.mkdir()
            return base
        leftover = try_claim(base)
        if leftover is not None:  # its builder died: start again in it
            with leftover:
                remove_tree(base)
            with contextlib.suppress(FileExistsError):
                base.mkdir()
                return base
        unique = base.with_name(f"{base.name}.{uuid.uuid4().hex[:12]}")
        unique.mkdir()
        return unique

    def find_exact(self, task_id: str) -> JobRef | None:
        for state in STATES:
            path = self.folders[state] / task_id
            if path.is_dir():
                return JobRef(task_id, state, path)
        return None

    # -- state changes -----------------------------------------------------------------------

    def claim(self, ref: JobRef) -> Claim | None:
        return try_claim(ref.path)

    def move(self, ref: JobRef, state: State, claim: Claim | None = None) -> JobRef:
        """Rename a (claimed) job into another state folder and stamp the time it arrived."""
        dest = self.folders[state] / ref.id
        if self.fsync:
            durable_rename(ref.path, dest)
        else:
            os.rename(ref.path, dest)
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(dest, (now, now))
        if claim is not None:
            claim.moved_to(dest)
        return JobRef(ref.id, state, dest)

    @staticmethod
    def is_open(ref: JobRef) -> bool:
        """True while the job's series is still arriving (more files may be linked in)."""
        return (ref.path / OPEN_MARKER).exists()

    def add_files(self, ref: JobRef, files: Iterable[Path]) -> int:
        """Link more instance files into an open job; returns how many were new."""
        added = 0
        for src in files:
            dest = ref.path / src.name
            if dest.exists():
                continue
            link_or_copy(src, dest)
            added += 1
        return added

    def close(self, ref: JobRef) -> None:
        """Mark an open job complete, after making its links durable."""
        if self.fsync:
            fsync_dir(ref.path)
        with contextlib.suppress(FileNotFoundError):
            (ref.path / OPEN_MARKER).unlink()
        if self.fsync:
            fsync_dir(ref.path)

    def read(self, ref: JobRef) -> Task:
        return read_task(ref.path)

    def write(self, ref: JobRef, task: Task) -> None:
        write_task(ref.path, task, fsync=self.fsync)

    def delete(self, ref: JobRef) -> None:
        remove_tree(ref.path)

    def age(self, ref: JobRef, now: float | None = None) -> float:
        """Seconds since the job entered its current state."""
        now = time.time() if now is None else now
        try:
            return now - ref.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def clean_staging(self) -> None:
        """Remove staging folders of creators that died (safe: they were never visible)."""
        for folder in self.folders.values():
            for entry in os.scandir(folder):
                if entry.name.startswith(STAGING_PREFIX):
                    claim = try_claim(Path(entry.path))
                    if claim is not None:
                        with claim:
                            remove_tree(Path(entry.path))


__all__ = ["STATES", "TASKFILE", "JobRef", "JobStore", "State"]
