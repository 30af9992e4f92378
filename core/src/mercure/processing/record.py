"""The processing record of a job (``processing.json`` in its folder): where processing stands.

Every decision the processor takes is written here (atomically) before it acts on it, so a
processor killed at any point resumes the job where it stood: a step that was launched is
re-attached through its handle, never started again; a step that ended is not run again; a
finished job is only moved on.

Phases of a job: ``running`` (steps in turn) -> ``finishing`` (results collected, the
dispatch job created, the job moved to ``success/``) or ``failed`` (moved to ``error/``).
Each step: ``pending`` -> ``launching`` (folders ready, ``run_id`` fixed) -> ``running``
(handle known) -> ``done`` | ``failed``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mercure.fsutil import atomic_write_bytes

RECORD_FILE = "processing.json"
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 4000

StepState = Literal["pending", "launching", "running", "done", "failed"]
Phase = Literal["running", "finishing", "failed", "finished"]


class StepRecord(BaseModel):
    """One module run of a job."""

    model_config = ConfigDict(extra="allow")

    module: str
    state: StepState = "pending"
    run_id: str = ""
    runner: str = ""
    """The runner instance that launched the run: the one that can follow its handle."""
    handle: str | None = None
    started_at: float | None = None
    unavailable_since: float | None = None
    """When its runner was first found unavailable at launch (launched again until
    :data:`mercure.runners.LAUNCH_PATIENCE` has passed); ``None`` once launched."""
    finished_at: float | None = None
    cancel_requested_at: float | None = None
    cancel_reason: str | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str = ""
    log_file: str | None = None
    outputs: int = 0
    """DICOM files the module wrote."""
    output: Any = None
    """The parsed ``result.json`` of the step (``None`` if it wrote none)."""

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


class ProcessingRecord(BaseModel):
    """The processing state of one job (see the module docstring)."""

    model_config = ConfigDict(extra="allow")

    attempt: int = 1
    phase: Phase = "running"
    steps: list[StepRecord]
    started_at: float
    finished_at: float | None = None
    failure: str | None = None
    failed_step: int | None = None
    dispatch_targets: list[str] | None = None
    """Decided when finishing (the rule's targets, or a module's ``__mercure_routing``)."""
    dispatch_job: str | None = None
    """The id of the outgoing job that delivers the results."""
    result_stage: Literal["built", "cleared"] | None = None
    """``built``: the results are collected in ``result/``; ``cleared``: the inputs are gone
    and the results are (being) moved to the top of the job folder."""
    notes: list[str] = []
    notified: bool = False
    earlier_attempts: list[str] = []

    @property
    def current(self) -> int | None:
        """The index of the step in progress (or next), None when all are done."""
        for i, step in enumerate(self.steps):
            if step.state != "done":
                return i
        return None

    def describe(self) -> str:
        """One line for ``mercure queue``: which module, in what state."""
        n = len(self.steps)
        if self.phase == "failed":
            if self.failed_step is None or not self.steps:
                return "failed"
            failed = self.failed_step
            return f"failed at step {failed + 1}/{n} ({self.steps[failed].module})"
        if self.phase in ("finishing", "finished"):
            return f"{self.phase} after {n} step(s)"
        i = self.current
        if i is None:
            return "all steps done"
        step = self.steps[i]
        text = f"step {i + 1}/{n} {step.module}: {step.state}"
        if step.state == "running" and step.duration is not None:
            text += f" for {step.duration:.0f}s"
        if step.cancel_requested_at is not None:
            text += f", stopping ({step.cancel_reason})"
        return text


def new_record(modules: list[str], attempt: int = 1) -> ProcessingRecord:
    return ProcessingRecord(
        attempt=attempt, steps=[StepRecord(module=m) for m in modules], started_at=time.time()
    )


def read_record(folder: Path) -> ProcessingRecord | None:
    """The job's record; None if processing has not begun. ``ValueError`` if unreadable."""
    try:
        data = json.loads((folder / RECORD_FILE).read_bytes())
    except FileNotFoundError:
        return None
    return ProcessingRecord.model_validate(data)


def write_record(folder: Path, record: ProcessingRecord, *, fsync: bool = True) -> None:
    payload = record.model_dump_json(indent=2).encode("utf-8")
    atomic_write_bytes(folder / RECORD_FILE, payload, fsync=fsync)


def log_tail(log: str, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last lines of a module's log, for error reasons and ``mercure job show``."""
    tail = "\n".join(log.rstrip().splitlines()[-lines:])
    return tail[-chars:]


__all__ = [
    "RECORD_FILE",
    "ProcessingRecord",
    "StepRecord",
    "log_tail",
    "new_record",
    "read_record",
    "write_record",
]
