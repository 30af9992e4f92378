"""Staged delivery of a series into a folder on a remote server: names, marker, plan.

Targets that write a job's instances into a folder on a server (``sftp``, ``rsync`` over
ssh, ...) share mercure's layout and the way a reader is kept from seeing half a series.
Layout (the defaults keep mercure's: ``<folder>/<task id>/<instance>`` plus ``.complete``)::

    <folder>/<folder_pattern>/                     the series, complete, with .complete in it
    <folder>/<parent>/.<name>.<task id>.partial/   hidden staging folder while it is sent
                                                   (``.<task id>.partial`` by default)
    <folder>/<folder_pattern>_<task id>/           if another job's series holds the name

A target sends the instances into the hidden staging folder (each under a hidden temporary
name, renamed once its bytes are all there), writes the ``.complete`` marker into it last,
and then renames the folder to its final name in one step: a reader sees either no series or
all of it, marker included. The marker holds the task id, so a retry after a crash between
the rename and the router's record recognises its own, complete series and sends nothing.

This module only computes: how the files get onto the server is each target's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from posixpath import basename, dirname, join, normpath
from typing import Any, Protocol

from mercure.instances import InstanceIndex
from mercure.patterns import TagPattern
from mercure.targets import DeliveryJob, DeliveryResult

MARKER = ".complete"
STAGING_SUFFIX = ".partial"
#: Pattern fields known without reading an instance's header.
JOB_FIELDS = frozenset({"filename", "task_id", "target"})
#: Fields that differ between the instances of one job: not usable for the job's folder.
PER_INSTANCE = frozenset({"filename", "SOPInstanceUID", "InstanceNumber"})


# -- the patterns of a layout ------------------------------------------------------------------


def _visible(setting: str, pattern: TagPattern) -> None:
    if any(part.startswith(".") for part in pattern.text.split("/")):
        raise ValueError(f"{setting} {pattern.text!r}: names starting with '.' are hidden")


def check_file_pattern(pattern: TagPattern) -> TagPattern:
    """Each instance needs a name of its own, visible to readers (no hidden components)."""
    if not {"filename", "SOPInstanceUID"} & set(pattern.fields):
        raise ValueError(
            f"file_pattern {pattern.text!r} must contain {{filename}} or {{SOPInstanceUID}}, "
            "or instances of one series would overwrite each other"
        )
    _visible("file_pattern", pattern)
    return pattern


def check_folder_pattern(pattern: TagPattern) -> TagPattern:
    """The job's folder comes from the series' tags, the same for every instance of the job."""
    used = PER_INSTANCE & set(pattern.fields)
    if used:
        raise ValueError(
            f"folder_pattern {pattern.text!r} uses {', '.join(sorted(used))}, which differs "
            "between the instances of a job; use series-level tags and {task_id}"
        )
    _visible("folder_pattern", pattern)
    return pattern


# -- the folders of one job ----------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPaths:
    """The remote paths of one job (POSIX paths as the server sees them)."""

    base: str
    final: str
    alternate: str
    staging: str

    @property
    def parent(self) -> str:
        return dirname(self.final)


def base_folder(folder: str) -> str:
    """The configured ``folder`` as the server's path (``.``: the account's login folder)."""
    return normpath(folder) if folder not in ("", ".") else "."


def series_paths(folder: str, relative: str, task_id: str) -> SeriesPaths:
    """Paths for a job whose folder renders to ``relative`` (already safe) below ``folder``."""
    base = base_folder(folder)
    final = join(base, relative)
    parent, name = dirname(final), basename(final)
    hidden = f".{name}" if name == task_id else f".{name}.{task_id}"
    return SeriesPaths(
        base=base,
        final=final,
        alternate=f"{final}_{task_id}",
        staging=join(parent, hidden + STAGING_SUFFIX),
    )


# -- the completion marker -----------------------------------------------------------------------


def marker_record(task_id: str, target: str) -> str:
    """The one line ``.complete`` holds (without its newline): the job that published it."""
    return json.dumps({"task_id": task_id, "target": target})


def marker_text(task_id: str, target: str) -> str:
    """Content of ``.complete``: mercure writes it empty; the task id lets a retry know it."""
    return marker_record(task_id, target) + "\n"


def marker_names(text: str, task_id: str) -> bool:
    """True if a ``.complete`` marker with content ``text`` was written by this job."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("task_id") == task_id


def marker_probe(task_id: str) -> str:
    """The part of :func:`marker_record` that names the job (for a ``grep -F`` on the server)."""
    return json.dumps({"task_id": task_id})[1:-1]


# -- what to send ----------------------------------------------------------------------------


class LayoutSettings(Protocol):
    """The settings a layout is made of (``SSHFolderTargetConfig`` has them)."""

    @property
    def folder(self) -> str: ...

    @property
    def folder_pattern(self) -> TagPattern: ...

    @property
    def file_pattern(self) -> TagPattern: ...


@dataclass(frozen=True)
class DeliveryPlan:
    """One job's folders, what to send where, and what cannot be sent (with the reason)."""

    job: DeliveryJob
    target: str
    paths: SeriesPaths
    #: Relative path in the job's folder -> local file.
    files: dict[str, Path]
    #: File name -> why it cannot be sent.
    failed: dict[str, str]

    def incomplete(self) -> DeliveryResult:
        """The result when some instances cannot be sent: a series without them must not
        appear as complete, so nothing is sent and the job fails at once."""
        return DeliveryResult(
            failed=self.failed,
            error=f"not sent: the series would be incomplete without {len(self.failed)} "
            "instance(s) that cannot be sent",
            permanent=True,
        )

    def delivered(
        self, log: Any, folder: str, uploaded: int, *, already_complete: bool
    ) -> DeliveryResult:
        """Log the series published in ``folder`` (or found complete from an earlier try,
        ``already_complete``) and report every file delivered."""
        log.info(
            "series was complete already" if already_complete else "series delivered",
            target=self.target,
            task_id=self.job.task_id,
            folder=folder,
            uploaded=uploaded,
            already_there=len(self.files) - uploaded,
        )
        return DeliveryResult(delivered=[p.name for p in self.files.values()])


@dataclass(frozen=True)
class RemoteLayout:
    """Where the jobs of one target go: its folder and patterns, and the target's name."""

    folder: str
    folder_pattern: TagPattern
    file_pattern: TagPattern
    target: str

    @classmethod
    def of(cls, settings: LayoutSettings, target: str) -> RemoteLayout:
        return cls(settings.folder, settings.folder_pattern, settings.file_pattern, target)

    @property
    def base(self) -> str:
        """The configured folder as the server's path; it must exist there."""
        return base_folder(self.folder)

    def paths(self, job: DeliveryJob) -> SeriesPaths:
        """The job's remote folders, from the series' tags (the same on every retry)."""
        values = {**job.tags, "task_id": job.task_id, "target": self.target}
        return series_paths(self.folder, self.folder_pattern.render(values), job.task_id)

    def plan(self, job: DeliveryJob) -> DeliveryPlan:
        """The job's folders and each file's relative path in it, or why it cannot be sent.

        Headers are read only when ``file_pattern`` needs more than the file name. A file
        that cannot be read, is missing, or renders to the path of another one is in
        ``failed`` with the reason.
        """
        paths = self.paths(job)
        pattern = self.file_pattern
        index: InstanceIndex | None = None
        if not set(pattern.fields) <= JOB_FIELDS:
            index = job.index()
        planned: dict[str, Path] = {}
        failed: dict[str, str] = {}
        for path in job.files:
            if index is not None:
                if path.name in index.unreadable:
                    failed[path.name] = index.unreadable[path.name]
                    continue
                rel = job.render(pattern, index, path.name, target=self.target)
            else:
                values = {"filename": path.name, "task_id": job.task_id, "target": self.target}
                rel = pattern.render(values)
            if rel in planned:
                failed[path.name] = (
                    f"file_pattern gives {rel!r} for both {planned[rel].name} and {path.name}; "
                    "include {SOPInstanceUID} or {filename}"
                )
                continue
            if not path.is_file():
                failed[path.name] = f"{path} is missing from the job folder"
                continue
            planned[rel] = path
        return DeliveryPlan(job, self.target, paths, planned, failed)


__all__ = [
    "JOB_FIELDS",
    "MARKER",
    "PER_INSTANCE",
    "STAGING_SUFFIX",
    "DeliveryPlan",
    "LayoutSettings",
    "RemoteLayout",
    "SeriesPaths",
    "base_folder",
    "check_file_pattern",
    "check_folder_pattern",
    "marker_names",
    "marker_probe",
    "marker_record",
    "marker_text",
    "series_paths",
]
