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
from typing import Any

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


def job_paths(
    job: DeliveryJob, folder: str, folder_pattern: TagPattern, target: str
) -> SeriesPaths:
    """The job's remote folders, from the series' tags (the same on every retry)."""
    values = {**job.tags, "task_id": job.task_id, "target": target}
    return series_paths(folder, folder_pattern.render(values), job.task_id)


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


# -- what to send --------------------------------------------------------------------------------


def plan(
    job: DeliveryJob, file_pattern: TagPattern, target: str
) -> tuple[dict[str, Path], dict[str, str]]:
    """Relative path in the job's folder -> local file; and the files that cannot be sent.

    Headers are read only when ``file_pattern`` needs more than the file name. A file that
    cannot be read, is missing, or renders to the path of another one is in the second map
    with the reason.
    """
    index: InstanceIndex | None = None
    if not set(file_pattern.fields) <= JOB_FIELDS:
        index = job.index()
    planned: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for path in job.files:
        if index is not None:
            if path.name in index.unreadable:
                failed[path.name] = index.unreadable[path.name]
                continue
            rel = job.render(file_pattern, index, path.name, target=target)
        else:
            values = {"filename": path.name, "task_id": job.task_id, "target": target}
            rel = file_pattern.render(values)
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
    return planned, failed


def incomplete(failed: dict[str, str]) -> DeliveryResult:
    """The result when some instances cannot be sent: a series without them must not appear
    as complete, so nothing is sent and the job fails at once."""
    return DeliveryResult(
        failed=failed,
        error=f"not sent: the series would be incomplete without {len(failed)} "
        "instance(s) that cannot be sent",
        permanent=True,
    )


def delivered(
    log: Any,
    target: str,
    task_id: str,
    folder: str,
    planned: dict[str, Path],
    uploaded: int,
    *,
    already_complete: bool,
) -> DeliveryResult:
    """Log a published series (or one found complete from an earlier try); all delivered."""
    log.info(
        "series was complete already" if already_complete else "series delivered",
        target=target,
        task_id=task_id,
        folder=folder,
        uploaded=uploaded,
        already_there=len(planned) - uploaded,
    )
    return DeliveryResult(delivered=[p.name for p in planned.values()])


__all__ = [
    "JOB_FIELDS",
    "MARKER",
    "PER_INSTANCE",
    "STAGING_SUFFIX",
    "SeriesPaths",
    "base_folder",
    "check_file_pattern",
    "check_folder_pattern",
    "delivered",
    "incomplete",
    "job_paths",
    "marker_names",
    "marker_probe",
    "marker_record",
    "marker_text",
    "plan",
    "series_paths",
]
