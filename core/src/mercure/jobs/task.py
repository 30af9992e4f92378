"""The task file (``task.json``) of a job: mercure's sections plus per-instance delivery state.

mercure's processing modules read this file, so its sections and field names are mercure's;
the fields this project adds (delivery state, tags, error reason) all have defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mercure.config_models import Action, Module
from mercure.fsutil import atomic_write_bytes

TASKFILE = "task.json"


class TaskInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: Action
    uid: str
    uid_type: Literal["series", "study"] = "series"
    triggered_rules: dict[str, Literal[True]] | str = {}
    applied_rule: str | None = None
    patient_name: str | None = None
    mrn: str = ""
    acc: str = ""
    sender_address: str = "MISSING"
    mercure_version: str = ""
    mercure_appliance: str = ""
    mercure_server: str = ""
    device_serial_number: str | None = None
    # mercure 0.4: where a job in error/ failed ("PROCESSING", "DISPATCHING", "ROUTING").
    fail_stage: str | None = None


class DeliveryAttempt(BaseModel):
    """One try at sending a job: when, how many files went, and why the rest did not."""

    at: float
    target: str = ""
    delivered: int
    failed: int
    error: str | None = None


class TaskDispatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    target_name: str | list[str]
    retries: int | None = 0
    next_retry_at: float | None = 0
    series_uid: str | None = None
    # Added by this project, keyed by target name: the instance files each target confirmed,
    # the reason each failed file failed last, and a short history of attempts.
    delivered: dict[str, list[str]] = {}
    failed: dict[str, dict[str, str]] = {}
    attempts: list[DeliveryAttempt] = []
    #: Targets whose ``finish`` step succeeded (the series is complete at the target).
    finished: list[str] = []


class TaskProcessing(BaseModel):
    model_config = ConfigDict(extra="allow")

    module_name: str
    module_config: Module | None = None
    settings: dict[str, Any] = {}
    retain_input_images: bool = False
    output: Any = None
    """The module's parsed ``result.json`` once it ran (any JSON; mercure expects an object)."""


class TaskStudy(BaseModel):
    model_config = ConfigDict(extra="allow")

    study_uid: str
    complete_trigger: str | None = None
    complete_required_series: str = ""
    creation_time: str = ""
    last_receive_time: str = ""
    received_series: list[str] | None = None
    received_series_uid: list[str] | None = None
    complete_force: bool = False
    # mercure 0.4: the rule's study_force_completion_action (discard, proceed or ignore).
    complete_force_action: str | None = "discard"


class StudyCollection(BaseModel):
    """This project's record of a study being collected (mercure modules never see it).

    ``parts`` are the routing plans whose series were added, so that a router that died while
    adding one adds it once; the times are epoch seconds (mercure's study section keeps local
    clock text); ``released`` says why the study left ``studies/``.
    """

    model_config = ConfigDict(extra="allow")

    rule: str
    parts: list[str] = []
    created_at: float = 0.0
    last_receive_at: float = 0.0
    released: str | None = None
    released_at: float | None = None


class Task(BaseModel):
    """A job's ``task.json``."""

    model_config = ConfigDict(extra="allow")

    info: TaskInfo
    id: str
    dispatch: TaskDispatch | dict[str, Any] = {}
    process: TaskProcessing | list[TaskProcessing] | dict[str, Any] = {}
    study: TaskStudy | dict[str, Any] = {}
    nomad_info: Any | None = None
    # Added by this project.
    created_at: float = 0.0
    tags: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    history: list[str] = []
    parent_id: str | None = None
    """The processing job whose results this job delivers (``both`` rules)."""
    collection: StudyCollection | None = None
    """Set on study jobs: how the study was collected and released."""

    @property
    def dispatch_state(self) -> TaskDispatch | None:
        return self.dispatch if isinstance(self.dispatch, TaskDispatch) else None

    @property
    def target_names(self) -> list[str]:
        d = self.dispatch_state
        if d is None:
            return []
        return [d.target_name] if isinstance(d.target_name, str) else list(d.target_name)


def read_task(folder: Path) -> Task:
    """Read ``folder/task.json``; raises ``FileNotFoundError`` or ``ValueError``."""
    data = json.loads((folder / TASKFILE).read_bytes())
    return Task.model_validate(data)


def write_task(folder: Path, task: Task, *, fsync: bool = True) -> None:
    """Atomically replace ``folder/task.json``."""
    payload = task.model_dump_json(indent=2, exclude_none=False).encode("utf-8")
    atomic_write_bytes(folder / TASKFILE, payload, fsync=fsync)
