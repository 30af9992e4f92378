"""Studies being collected: the series of one study gathered per study-level rule.

Layout (mercure's)::

    studies/<StudyInstanceUID>#<rule>/
      task.json              the study job's task file: mercure's ``study`` section
                             (received series, times, trigger) and what the job does next
      <sop-instance>.dcm     the instances of every series added so far (hard links)
      .force-complete        an operator's (or mercure's UI's) request to release it now
      .lock                  the claim of whoever adds a series or releases the study

Every change happens under the folder's claim: a series is added by linking its files in,
then rewriting ``task.json`` atomically with the series recorded (its plan id in
``collection.parts``, so that a router that died between the two steps adds it once); the
study is released by renaming the whole folder into ``outgoing/``, ``processing/``,
``success/`` or ``discard/`` under its task id. A series that comes after the rename finds no
folder and starts a new study job: nothing is ever added to a study that already left.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mercure.fsutil import durable_rename, fsync_dir, link_or_copy, safe_component
from mercure.jobs.claims import Claim, try_claim
from mercure.jobs.store import JobRef, JobStore, State
from mercure.jobs.task import (
    TASKFILE,
    StudyCollection,
    Task,
    TaskStudy,
    read_task,
    write_task,
)

FORCE_COMPLETE = ".force-complete"
SEPARATOR = "#"
INVALID = "#@INVALID@#"
"""mercure's placeholder for a tag a series lacks in the study's lists."""
CLAIM_WAIT = 5.0
"""Seconds a router waits for a study another process holds before trying on its next pass."""


def clock_text(epoch: float) -> str:
    """mercure's time stamps in the study section: local clock time, to the second."""
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def collection_name(study_uid: str, rule: str) -> str:
    """``<StudyInstanceUID>#<rule>`` as a safe folder name.

    Both parts come from outside (a sender's UID, an operator's rule name); where making them
    safe changed the rule name, a short hash of the real name keeps two rules apart.
    """
    safe_rule = safe_component(rule, max_len=80)
    if safe_rule != rule:
        safe_rule += "-" + hashlib.sha1(rule.encode("utf-8")).hexdigest()[:8]
    return f"{safe_component(study_uid, max_len=64)}{SEPARATOR}{safe_rule}"


class StudyBusy(OSError):
    """Another process holds the study for longer than a router waits; try again later."""


@dataclass(frozen=True)
class StudyRef:
    """A study being collected."""

    name: str
    path: Path


@dataclass(frozen=True)
class SeriesPart:
    """One series handed to a study: the plan entry it comes from and what to record."""

    key: str
    series_uid: str
    description: str
    files: list[Path]


@dataclass(frozen=True)
class OpenStudy:
    """A study being collected, as ``mercure study list`` and the dashboard show it.

    ``error`` is set (and the rest left empty) when its task file cannot be read.
    """

    ref: StudyRef
    task_id: str = ""
    study_uid: str = ""
    rule: str = ""
    trigger: str = ""
    required: str = ""
    series: tuple[str, ...] = ()
    instances: int = 0
    created_at: float = 0.0
    last_receive_at: float = 0.0
    force_requested: bool = False
    force_action: str = ""
    error: str = ""


class StudyStore:
    """The ``studies/`` folder: add series, list, claim and release studies."""

    def __init__(self, folder: Path, jobs: JobStore, *, fsync: bool = True) -> None:
        self.folder = folder
        self.jobs = jobs
        self.fsync = fsync
        # Made when a study rule needs it, too: a configuration without study rules may leave
        # studies_folder at mercure's default, which need not exist (or be writable) here.
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[StudyRef]:
        if not self.folder.is_dir():
            return []
        with os.scandir(self.folder) as entries:
            return sorted(
                (
                    StudyRef(e.name, Path(e.path))
                    for e in entries
                    if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                ),
                key=lambda r: r.name,
            )

    def open_studies(self) -> list[OpenStudy]:
        """Every study being collected, read from its task file (no claim taken: a study
        released meanwhile is simply gone at the next look). A folder without a task file
        is left out: its first series is being added (or it is an orphan the router removes).
        """
        found = []
        for ref in self.entries():
            try:
                task = read_task(ref.path)
                collection = ensure_collection(task)
                instances = self.instance_count(ref)
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                if ref.path.is_dir():  # else released meanwhile
                    found.append(OpenStudy(ref, error="task.json unreadable"))
                continue
            study = task.study
            if collection is None or not isinstance(study, TaskStudy):
                found.append(OpenStudy(ref, error="task.json has no study section"))
                continue
            found.append(
                OpenStudy(
                    ref,
                    task_id=task.id,
                    study_uid=study.study_uid,
                    rule=collection.rule,
                    trigger=study.complete_trigger or "timeout",
                    required=study.complete_required_series or "",
                    series=tuple(study.received_series or ()),
                    instances=instances,
                    created_at=collection.created_at,
                    last_receive_at=collection.last_receive_at,
                    force_requested=study.complete_force or self.force_requested(ref),
                    force_action=study.complete_force_action or "ignore",
                )
            )
        return found

    def find(self, study_uid: str) -> list[StudyRef]:
        """The studies being collected for ``study_uid`` (one per study rule)."""
        prefix = safe_component(study_uid, max_len=64) + SEPARATOR
        return [ref for ref in self.entries() if ref.name.startswith(prefix)]

    # -- adding series -----------------------------------------------------------------------

    def add_series(
        self,
        study_uid: str,
        rule: str,
        part: SeriesPart,
        new_task: Callable[[], Task],
        now: float | None = None,
        before_add: Callable[[Task], None] | None = None,
    ) -> tuple[Task, bool]:
        """Add one series to the study of ``rule`` (made with ``new_task()`` if none is open).

        Idempotent per ``part.key``. ``before_add(task)`` runs under the claim before any file
        is linked (the router records there which study job the series goes to). Returns the
        study's task and whether this call started the study. Raises :class:`StudyBusy` if the
        study stays claimed by someone else.
        """
        path = self.folder / collection_name(study_uid, rule)
        self.folder.mkdir(parents=True, exist_ok=True)  # an OSError here says why
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                if self.fsync:
                    fsync_dir(self.folder)
            claim = try_claim(path)
            if claim is not None:
                with claim:
                    return self._add_claimed(path, part, new_task, now, before_add)
            if time.monotonic() > deadline:
                raise StudyBusy(f"study folder {path.name} is held by another process")
            time.sleep(0.02)  # being released (then it is gone) or another series is added

    def _add_claimed(
        self,
        path: Path,
        part: SeriesPart,
        new_task: Callable[[], Task],
        now: float | None,
        before_add: Callable[[Task], None] | None,
    ) -> tuple[Task, bool]:
        now = time.time() if now is None else now
        started = False
        try:
            task = read_task(path)
        except FileNotFoundError:
            task = new_task()
            started = True
        collection = ensure_collection(task)
        if collection is None or not isinstance(task.study, TaskStudy):
            raise ValueError(f"study folder {path.name}: task.json has no study section")
        if part.key in collection.parts:
            return task, False
        if before_add is not None:
            before_add(task)
        # The files first, then the record: a crash in between leaves files the record does
        # not know yet (added again, harmlessly), never a record of files that are not there.
        for src in part.files:
            link_or_copy(src, path / src.name)
        if self.fsync:
            fsync_dir(path)
        study = task.study
        study.last_receive_time = clock_text(now)
        study.received_series = [*(study.received_series or []), part.description]
        study.received_series_uid = [*(study.received_series_uid or []), part.series_uid]
        collection.parts.append(part.key)
        collection.last_receive_at = now
        write_task(path, task, fsync=self.fsync)
        return task, started

    # -- releasing ---------------------------------------------------------------------------

    def claim(self, ref: StudyRef) -> Claim | None:
        return try_claim(ref.path)

    def release(self, ref: StudyRef, task: Task, state: State, claim: Claim) -> JobRef:
        """Rename the claimed study folder into ``state`` as the job ``task.id``.

        ``task`` is written first (with why it was released); the rename is the one step that
        makes the study a job, so a crash leaves either the study or the job, never both.
        """
        write_task(ref.path, task, fsync=self.fsync)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ref.path / FORCE_COMPLETE)
        dest = self.jobs.folders[state] / task.id
        if self.fsync:
            durable_rename(ref.path, dest)
        else:
            os.rename(ref.path, dest)
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(dest, (now, now))
        claim.moved_to(dest)
        return JobRef(task.id, state, dest)

    @staticmethod
    def force_requested(ref: StudyRef) -> bool:
        return (ref.path / FORCE_COMPLETE).exists()

    def request_force(self, ref: StudyRef) -> None:
        """Ask for the study to be released now (mercure's ``.force-complete`` marker)."""
        marker = ref.path / FORCE_COMPLETE
        marker.touch()
        if self.fsync:
            fsync_dir(ref.path)

    @staticmethod
    def instance_count(ref: StudyRef) -> int:
        with os.scandir(ref.path) as entries:
            return sum(1 for e in entries if e.name.endswith(".dcm") and e.name[0] != ".")


def ensure_collection(task: Task) -> StudyCollection | None:
    """The collection record; made from mercure's study section for a study mercure began."""
    if task.collection is not None:
        return task.collection
    if not isinstance(task.study, TaskStudy):
        return None

    def epoch(text: str, default: float) -> float:
        try:
            return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            return default

    now = time.time()
    created = epoch(task.study.creation_time, now)
    task.collection = StudyCollection(
        rule=task.info.applied_rule or "",
        created_at=created,
        last_receive_at=epoch(task.study.last_receive_time, created),
    )
    return task.collection


def series_part(key: str, tags: dict[str, str], files: Iterable[Path]) -> SeriesPart:
    return SeriesPart(
        key=key,
        series_uid=tags.get("SeriesInstanceUID", INVALID),
        description=tags.get("SeriesDescription", INVALID),
        files=list(files),
    )


__all__ = [
    "FORCE_COMPLETE",
    "TASKFILE",
    "OpenStudy",
    "SeriesPart",
    "StudyBusy",
    "StudyRef",
    "StudyStore",
    "clock_text",
    "collection_name",
    "ensure_collection",
    "series_part",
]
