"""Helpers for the DICOMweb target's tests: jobs for ``send``, a scripted ``more``, targets."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob
from mercure_target_dicomweb import DicomWebTarget, DicomWebTargetConfig


def job_for(
    files: list[Path],
    more: Callable[[float], list[Path] | None] | None = None,
    confirm: Callable[[list[str]], None] | None = None,
) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="web"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task, more=more, confirm=confirm)


def scripted_more(
    batches: list[list[Path] | None],
) -> tuple[Callable[[float], list[Path] | None], list[float]]:
    """A ``DeliveryJob.more`` handing out ``batches`` one call at a time (``[]``: waits)."""
    calls: list[float] = []
    queue = iter(batches)

    def more(timeout: float) -> list[Path] | None:
        calls.append(timeout)
        batch = next(queue)
        if batch == []:
            time.sleep(timeout)  # like the dispatcher's: wait, then report that nothing came
        return batch

    return more, calls


def target(url: str, **settings: Any) -> DicomWebTarget:
    """A ``dicomweb`` target for ``url`` with short timeouts."""
    settings.setdefault("timeout", 10)
    return DicomWebTarget("web", DicomWebTargetConfig(url=url, **settings))


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
