"""A processing job's folders: what a module gets, what it wrote, what is kept.

Layout of a job in ``processing/`` (the instances and ``task.json`` the router wrote stay as
they are until the job has moved on, so that ``mercure job retry`` can start again)::

    <task id>/
      task.json, <instance>.dcm     the job as the router made it
      processing.json               the processing record (mercure.processing.record)
      work/<step>/in/               the module's MERCURE_IN_DIR
      work/<step>/out/              the module's MERCURE_OUT_DIR
      work/<step>/run/              the runner's own files for this run
      result/                       the results, collected before they replace the inputs
      logs/<attempt>.<step>.<module>.log

A module's input holds, as in mercure, ``<SeriesInstanceUID>#<name>.dcm`` (hard links, no
copies), a ``.tags`` JSON file beside each, and ``task.json`` whose ``process`` section is
this step's (with ``settings``). Step ``n+1`` gets step ``n``'s output (without its
``result.json``). Each step folder is built under a hidden name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from mercure.fsutil import atomic_write_bytes, fsync_dir, link_or_copy, remove_tree, safe_component
from mercure.jobs.incoming import instance_files
from mercure.jobs.task import TASKFILE, Task, TaskDispatch, TaskProcessing
from mercure.processing.record import RECORD_FILE
from mercure.processing.results import RESULT_FILE
from mercure.tags import RECEIVER_AET, SENDER_ADDRESS, SENDER_AET, read_tags

WORK = "work"
RESULT = "result"
LOGS = "logs"
DCM = ".dcm"
TAGS = ".tags"
SEPARATOR = "#"
#: Sections of task.json that mercure's modules know (mercure's Task forbids other keys).
MERCURE_TASK_KEYS = ("id", "info", "dispatch", "process", "study", "nomad_info")
MERCURE_DISPATCH_KEYS = ("target_name", "retries", "next_retry_at", "series_uid")
RECEIVER_TAGS = (SENDER_ADDRESS, SENDER_AET, RECEIVER_AET)
#: Names in a job folder that belong to the router: a module output of that name is not kept.
RESERVED = frozenset({TASKFILE, RECORD_FILE, WORK, RESULT, LOGS, ".lock"})


@dataclass(frozen=True)
class StepFolders:
    root: Path
    input: Path
    output: Path
    run: Path


def step_folders(job: Path, index: int) -> StepFolders:
    root = job / WORK / str(index)
    return StepFolders(root, root / "in", root / "out", root / "run")


def processes_of(task: Task) -> list[TaskProcessing]:
    """The job's modules in order (mercure: one object, or a list for a chain)."""
    process = task.process
    if isinstance(process, TaskProcessing):
        return [process]
    if isinstance(process, list):
        return list(process)
    return []


def module_task(task: Task, process: TaskProcessing) -> dict[str, Any]:
    """``task.json`` as mercure writes it for one step: mercure's sections only."""
    data = task.model_dump(mode="json", include=set(MERCURE_TASK_KEYS))
    data["process"] = process.model_dump(mode="json")
    if isinstance(task.dispatch, TaskDispatch):
        data["dispatch"] = {k: data["dispatch"].get(k) for k in MERCURE_DISPATCH_KEYS}
    return data


def prepare_step(
    job: Path,
    task: Task,
    index: int,
    *,
    extra_tags: list[str],
    fsync: bool = True,
) -> StepFolders:
    """Build step ``index``'s folders from the job's instances or the previous step's output.

    Safe to repeat: a half-built step of a processor that died is removed first (a step is
    only prepared before it was launched).
    """
    folders = step_folders(job, index)
    remove_tree(folders.root)
    staging = job / WORK / f".prep-{index}"
    remove_tree(staging)
    (staging / "in").mkdir(parents=True)
    (staging / "out").mkdir()
    (staging / "run").mkdir()
    if index == 0:
        link_inputs(job, staging / "in", task, extra_tags, fsync=fsync)
    else:
        link_tree(step_folders(job, index - 1).output, staging / "in", skip={RESULT_FILE, TASKFILE})
    process = processes_of(task)[index]
    payload = json.dumps(module_task(task, process), indent=2).encode("utf-8")
    atomic_write_bytes(staging / "in" / TASKFILE, payload, fsync=fsync)
    if fsync:
        for sub in ("in", "out", "run"):
            fsync_dir(staging / sub)
        fsync_dir(staging)
    os.rename(staging, folders.root)
    if fsync:
        fsync_dir(folders.root.parent)
    return folders


def link_inputs(
    job: Path, dest: Path, task: Task, extra_tags: list[str], *, fsync: bool = True
) -> int:
    """The job's instances as mercure names them, each with its ``.tags`` file."""
    receiver = {k: task.tags[k] for k in RECEIVER_TAGS if k in task.tags}
    count = 0
    for path in instance_files(job):
        try:
            tags = read_tags(str(path), extra_tags)
        except Exception:  # an unreadable header: the module decides what to do with it
            tags = {}
        series = safe_component(tags.get("SeriesInstanceUID") or task.info.uid or "series")
        stem = f"{series}{SEPARATOR}{path.stem}"
        link_or_copy(path, dest / f"{stem}{DCM}")
        tags.update(receiver)
        with open(dest / f"{stem}{TAGS}", "wb") as fh:
            fh.write(json.dumps(tags, ensure_ascii=False).encode("utf-8"))
            if fsync:
                os.fdatasync(fh.fileno())
        count += 1
    return count


def sync_tree(folder: Path) -> None:
    """Make what a module wrote durable before it is relied on (its files and folders)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def link_tree(source: Path, dest: Path, *, skip: Collection[str] = ()) -> int:
    """Hard-link every file under ``source`` into ``dest``, but not the top-level ``skip``."""
    count = 0
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        if rel.parts and rel.parts[0] in skip:
            dirs.clear()
            continue
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if not rel.parts and name in skip:
                continue
            link_or_copy(Path(root) / name, dest / rel / name)
            count += 1
        dirs.sort()
    return count


def ensure_task_file(folders: StepFolders) -> bool:
    """Copy ``task.json`` into the output if the module did not (mercure does the same)."""
    target = folders.output / TASKFILE
    if target.exists():
        return False
    shutil.copyfile(folders.input / TASKFILE, target)
    return True


def written_files(folder: Path) -> list[Path]:
    """Every file a module wrote into ``folder`` (recursively), without ``task.json``."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.parent == folder and name == TASKFILE:
                continue
            found.append(path)
    return sorted(found)


def dicom_outputs(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (``*.dcm``): what is delivered."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(DCM) and p.name[0] != "."
    )


def check_dicom(path: Path) -> str | None:
    """None if ``path`` is a DICOM file with a SOP Instance UID, else what is wrong."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        return f"not a DICOM file ({exc})"
    except Exception as exc:
        return f"cannot be read as DICOM ({exc.__class__.__name__}: {exc})"
    if not getattr(ds, "SOPInstanceUID", None):
        return "has no SOPInstanceUID"
    return None


def build_result(
    job: Path,
    last: StepFolders,
    *,
    chain_results: list[tuple[str, Any]] | None,
    retained_from: Path | None,
    fsync: bool = True,
) -> list[str]:
    """Collect the results into ``job/result`` (atomically); returns notes for the history.

    ``chain_results`` (for a chain of modules) replaces the last module's ``result.json``
    by mercure's ``[[module, result], ...]``; ``retained_from`` adds the original inputs
    (``processing_retain_images``) where a module's output does not have the same name.
    """
    notes: list[str] = []
    final = job / RESULT
    staging = job / f".{RESULT}-tmp"
    remove_tree(staging)
    staging.mkdir()
    dropped = sorted(p.name for p in last.output.iterdir() if p.name in RESERVED - {TASKFILE})
    if dropped:
        notes.append(f"module output(s) {', '.join(dropped)} not kept: the names are the router's")
    skip = RESERVED | ({RESULT_FILE} if chain_results is not None else set())
    link_tree(last.output, staging, skip=skip)
    if chain_results is not None:
        payload = json.dumps([[m, o] for m, o in chain_results], indent=2).encode("utf-8")
        atomic_write_bytes(staging / RESULT_FILE, payload, fsync=fsync)
    if retained_from is not None:
        kept = collided = 0
        for path in sorted(retained_from.iterdir()):
            if not path.name.endswith(DCM):
                continue
            if (staging / path.name).exists():
                collided += 1
                continue
            link_or_copy(path, staging / path.name)
            kept += 1
        notes.append(f"{kept} input image(s) kept with the results (processing_retain_images)")
        if collided:
            notes.append(
                f"{collided} input image(s) not kept: a module output has the same file name"
            )
    if fsync:
        fsync_dir(staging)
    remove_tree(final)
    os.rename(staging, final)
    if fsync:
        fsync_dir(job)
    return notes


def clear_inputs(job: Path, fsync: bool = True) -> None:
    """Remove the job's own instances and work folders once its results are collected.

    Run once, before :func:`place_result` (which moves output instances to where these
    were): the processing record says which of the two is due.
    """
    for path in instance_files(job):
        path.unlink(missing_ok=True)
    remove_tree(job / WORK)
    if fsync:
        fsync_dir(job)


def place_result(job: Path, fsync: bool = True) -> None:
    """Move the collected results to the top of the job folder (repeatable)."""
    result = job / RESULT
    if not result.is_dir():
        return
    for entry in sorted(result.iterdir()):
        dest = job / entry.name
        if dest.is_dir() and not dest.is_symlink():
            remove_tree(dest)
        os.rename(entry, dest)
    result.rmdir()
    if fsync:
        fsync_dir(job)


def reset_for_retry(job: Path) -> None:
    """Remove what an earlier attempt left (the job's own instances and logs stay)."""
    remove_tree(job / WORK)
    remove_tree(job / RESULT)
    remove_tree(job / f".{RESULT}-tmp")


__all__ = [
    "LOGS",
    "RESULT",
    "WORK",
    "StepFolders",
    "build_result",
    "check_dicom",
    "clear_inputs",
    "dicom_outputs",
    "ensure_task_file",
    "module_task",
    "place_result",
    "prepare_step",
    "processes_of",
    "reset_for_retry",
    "step_folders",
    "sync_tree",
    "written_files",
]
