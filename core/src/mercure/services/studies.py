"""Study jobs: series collected per study rule, released when the study is complete.

The router hands each series that a study-level rule (``action_trigger: study``) matched to
:func:`collect_series`; once per pass it calls :meth:`StudyReleaser.run_once`, which releases
every study whose trigger holds, as mercure's ``route_studies`` does:

* ``timeout``: ``study_complete_trigger`` seconds passed since the last series was added, and
  no series of the study is still arriving (in ``incoming/`` or being routed);
* ``received_series``: the rule's ``study_trigger_series`` (quoted, case-insensitive
  substrings of SeriesDescription with and/or/not/parentheses) holds for the series received
  (an empty list means ``timeout``);
* forced: ``.force-complete`` in the study folder (``mercure study complete``, mercure's UI);
* otherwise, ``study_forcecomplete_trigger`` seconds after the study's first series, the
  rule's ``study_force_completion_action``: ``discard`` (to ``discard/``), ``proceed`` (released
  with what arrived) or ``ignore`` (keeps waiting).

A released study is a job like a series job: ``route`` goes to ``outgoing/``, ``process`` and
``both`` to ``processing/``, ``notification`` to ``success/`` after its notifications.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from mercure import __version__
from mercure.config import Config, Rule
from mercure.events import TaskEvent, TaskEventType
from mercure.fsutil import atomic_write_bytes, durable_rename, remove_tree
from mercure.jobs.incoming import read_series_tags
from mercure.jobs.store import State
from mercure.jobs.studies import (
    StudyRef,
    StudyStore,
    clock_text,
    ensure_collection,
    series_part,
)
from mercure.jobs.task import (
    StudyCollection,
    Task,
    TaskDispatch,
    TaskInfo,
    TaskStudy,
    read_task,
    write_task,
)
from mercure.logs import get_logger
from mercure.mpps import MppsIndex
from mercure.services.runtime import Runtime
from mercure.study_trigger import parse_completion_series

RELEASE_STATE: dict[str, State] = {
    "route": "outgoing",
    "process": "processing",
    "both": "processing",
    "notification": "success",
}
INTENT_PREFIX = ".study-"
ORPHAN_AGE = 3600.0
"""An unclaimed study folder with no task file and no instance is removed after this long."""

log = get_logger("mercure.router")


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def study_task(
    config: Config,
    rule_name: str,
    tags: dict[str, str],
    processes: Any,
    now: float,
) -> Task:
    """A new study job's task file, filled as mercure's ``create_study_task`` fills it.

    ``received_series`` start empty: :meth:`StudyStore.add_series` records each series,
    the first one included.
    """
    rule: Rule = config.rules[rule_name]
    study_uid = tags.get("StudyInstanceUID", "")
    dispatch: Any = {}
    if rule.action in ("route", "both") and rule.targets:
        dispatch = TaskDispatch(
            target_name=rule.targets[0] if len(rule.targets) == 1 else rule.targets
        )
    info = TaskInfo(
        action=rule.action,
        uid=study_uid,
        uid_type="study",
        triggered_rules={rule_name: True},
        applied_rule=rule_name,
        patient_name=tags.get("PatientName", "MISSING"),
        mrn=tags.get("PatientID", "MISSING"),
        acc=tags.get("AccessionNumber", "MISSING"),
        sender_address=tags.get("SenderAddress", "MISSING"),
        mercure_version=__version__,
        mercure_appliance=config.appliance_name,
        mercure_server=socket.gethostname(),
        device_serial_number=tags.get("DeviceSerialNumber"),
    )
    study = TaskStudy(
        study_uid=study_uid,
        complete_trigger=rule.study_trigger_condition,
        complete_required_series=rule.study_trigger_series,
        creation_time=clock_text(now),
        last_receive_time=clock_text(now),
        received_series=[],
        received_series_uid=[],
        complete_force=False,
        complete_force_action=rule.study_force_completion_action,
    )
    return Task(
        info=info,
        id=str(uuid.uuid4()),
        dispatch=dispatch,
        process=processes or {},
        study=study,
        created_at=now,
        tags=dict(tags),
        collection=StudyCollection(rule=rule_name, created_at=now, last_receive_at=now),
        history=[f"{now_text()} study collection started for rule {rule_name}"],
    )


def collect_series(
    runtime: Runtime,
    studies: StudyStore,
    series_folder: Path,
    key: str,
    template: dict[str, Any],
    files: list[Path],
) -> Task | None:
    """Add a complete series to its study (``template`` is the plan's study task).

    Before any file is linked, the study job the series goes to is recorded in the series
    folder (``.study-<key>``). A router that died after that finds, on its next try, whether
    that job already left ``studies/`` holding the series; then it is not added again to a new
    study. Returns the study's task, or None if the series was in it already.
    """
    tags: dict[str, str] = dict(template.get("tags", {}))
    rule = str(template["collection"]["rule"])
    intent = series_folder / f"{INTENT_PREFIX}{key}"
    if _already_released_with(runtime, intent, key, files):
        return None
    now = time.time()

    def new_task() -> Task:
        task = Task.model_validate(template)
        task.created_at = now
        assert task.collection is not None and isinstance(task.study, TaskStudy)
        task.collection.created_at = now
        task.study.creation_time = clock_text(now)
        return task

    def record_intent(task: Task) -> None:
        atomic_write_bytes(intent, task.id.encode(), fsync=runtime.fsync)

    part = series_part(key, tags, files)
    task, started = studies.add_series(
        tags.get("StudyInstanceUID", ""), rule, part, new_task, now, before_add=record_intent
    )
    study = task.study
    assert isinstance(study, TaskStudy)
    log.info(
        "series added to study" if not started else "study collection started",
        task_id=task.id,
        study_uid=study.study_uid,
        series_uid=part.series_uid,
        rule=rule,
        series=len(study.received_series or []),
    )
    runtime.emit(
        TaskEvent(
            TaskEventType.STUDY_COLLECTED,
            task.id,
            part.series_uid,
            file_count=len(files),
            info=f"series added to study {study.study_uid} ({len(study.received_series or [])} "
            "series so far)",
            rule=rule,
            tags=tags,
            extra={"study_uid": study.study_uid, "started": started},
        )
    )
    return task


def _already_released_with(runtime: Runtime, intent: Path, key: str, files: list[Path]) -> bool:
    """Did an earlier try add this series to a study job that has left ``studies/`` since?"""
    try:
        job_id = intent.read_text().strip()
    except FileNotFoundError:
        return False
    ref = runtime.store.find_exact(job_id) if job_id else None
    if ref is None:
        return False  # still being collected (the add is idempotent), or never made
    try:
        task = read_task(ref.path)
    except (OSError, ValueError):
        return True  # the job exists; what it holds is the job's business now
    if task.collection is not None and key in task.collection.parts:
        return True
    # Linked but not recorded when the router died: the files travel with that job.
    return all((ref.path / f.name).exists() for f in files)


class StudyReleaser:
    """Releases complete studies; one :meth:`run_once` per router pass."""

    def __init__(
        self, runtime: Runtime, studies: StudyStore, mpps: MppsIndex | None = None
    ) -> None:
        self.runtime = runtime
        self.studies = studies
        self.mpps = mpps
        self._pending: set[str] | None = None

    def run_once(self, now: float | None = None) -> int:
        """Release (or discard) every study whose trigger holds; returns how many."""
        now = time.time() if now is None else now
        self._pending = None
        released = 0
        for ref in self.studies.entries():
            claim = self.studies.claim(ref)
            if claim is None:
                continue  # a series is being added, or another router releases it
            with claim:
                if not ref.path.is_dir():
                    continue
                released += self._check(ref, claim, now)
        return released

    def _check(self, ref: StudyRef, claim: Any, now: float) -> int:
        try:
            task = read_task(ref.path)
        except FileNotFoundError:
            self._orphan(ref, now)
            return 0
        except ValueError as exc:
            self._to_error(ref, None, claim, f"task.json of study {ref.name} cannot be read: {exc}")
            return 1
        collection = ensure_collection(task)
        study = task.study
        if collection is None or not isinstance(study, TaskStudy):
            self._to_error(ref, task, claim, f"study {ref.name}: task.json has no study section")
            return 1
        if self.studies.instance_count(ref) == 0:
            return 0  # mercure waits for a study with no images
        decision = self.decide(ref, task, collection, study, now)
        if decision is None:
            return 0
        outcome, reason = decision
        if outcome == "discard":
            self._release(ref, task, claim, "discard", reason, now)
            return 1
        state = RELEASE_STATE.get(task.info.action)
        if state is None:
            self._to_error(
                ref, task, claim, f"study {ref.name}: action '{task.info.action}' cannot be "
                "applied to a study",
            )  # fmt: skip
            return 1
        self._release(ref, task, claim, state, reason, now)
        return 1

    def decide(
        self,
        ref: StudyRef,
        task: Task,
        collection: StudyCollection,
        study: TaskStudy,
        now: float,
    ) -> tuple[str, str] | None:
        """``("proceed" | "discard", reason)`` if the study is to leave now, else None."""
        config = self.runtime.config
        if study.complete_force or self.studies.force_requested(ref):
            study.complete_force = True
            return "proceed", "completion forced by an operator"
        if self.mpps is not None:
            received = set(study.received_series_uid or [])
            present = {n for n in os.listdir(ref.path) if n.endswith(".dcm")}
            listed = self.mpps.study_complete(study.study_uid, received, present)
            if listed is not None and not self._arriving(study.study_uid):
                return "proceed", f"MPPS: the {len(listed)} series of the completed step(s) are in"
        trigger = study.complete_trigger or "timeout"
        required = study.complete_required_series or ""
        if trigger == "received_series" and not required.strip():
            trigger = "timeout"
        if trigger == "timeout":
            quiet = now - collection.last_receive_at
            if quiet > config.study_complete_trigger and not self._arriving(study.study_uid):
                return "proceed", f"timeout: no new series for {quiet:.0f} s"
        elif trigger == "received_series":
            if parse_completion_series(required, list(study.received_series or [])):
                return "proceed", f"the required series arrived ({required.strip()})"
        else:
            log.warning("study has an unknown trigger; only forcing completes it",
                        study=ref.name, trigger=trigger)  # fmt: skip
        age = now - collection.created_at
        if age > config.study_forcecomplete_trigger:
            action = study.complete_force_action or "ignore"
            if action == "discard":
                return "discard", f"incomplete after {age:.0f} s: discarded (force completion)"
            if action == "proceed":
                study.complete_force = True
                return "proceed", f"incomplete after {age:.0f} s: proceeding with what arrived"
        return None

    def _arriving(self, study_uid: str) -> bool:
        """Is a series of this study still arriving or being routed (mercure's pending)?"""
        if self._pending is None:
            spool = self.runtime.spool
            found: set[str] = set()
            for folder in [s.path for s in spool.series()] + spool.taken():
                tags = read_series_tags(folder)
                if tags is not None and tags.get("StudyInstanceUID"):
                    found.add(tags["StudyInstanceUID"])
            self._pending = found
        return study_uid in self._pending

    def _release(
        self, ref: StudyRef, task: Task, claim: Any, state: State, reason: str, now: float
    ) -> None:
        assert task.collection is not None and isinstance(task.study, TaskStudy)
        instances = self.studies.instance_count(ref)
        series = list(task.study.received_series_uid or [])
        task.collection.released = reason
        task.collection.released_at = now
        if state == "discard":
            task.info.action = "discard"
        task.history.append(
            f"{now_text()} study released to {state}/: {reason} ({len(series)} series, "
            f"{instances} instances)"
        )
        job = self.studies.release(ref, task, state, claim)
        rule = task.info.applied_rule or task.collection.rule
        study_uid = task.study.study_uid
        log.info("study released", task_id=task.id, study_uid=study_uid, rule=rule, to=state,
                 reason=reason, series=len(series), instances=instances)  # fmt: skip
        common: dict[str, Any] = {"tags": task.tags, "rule": rule, "file_count": instances}
        self.runtime.emit(
            TaskEvent(
                TaskEventType.STUDY_RELEASED,
                job.id,
                study_uid,
                ", ".join(task.target_names),
                info=reason,
                extra={"study_uid": study_uid, "series": series, "state": state},
                **common,
            )
        )
        if state == "discard":
            self.runtime.emit(TaskEvent(TaskEventType.DISCARDED, job.id, study_uid, info=reason,
                                        **common))  # fmt: skip
            return
        kind = {
            "outgoing": TaskEventType.ROUTED,
            "processing": TaskEventType.QUEUED_FOR_PROCESSING,
            "success": TaskEventType.NOTIFICATION,
        }[state]
        self.runtime.emit(
            TaskEvent(kind, job.id, study_uid, ", ".join(task.target_names), **common)
        )
        # mercure notifies reception when a study is released; a notification rule's study
        # is complete at once.
        self.runtime.notify_rule("reception", rule, job.id, task.tags)
        if state == "success":
            self.runtime.notify_rule("completion", rule, job.id, task.tags)
            self.runtime.emit(TaskEvent(TaskEventType.COMPLETED, job.id, study_uid, **common))

    def _to_error(self, ref: StudyRef, task: Task | None, claim: Any, reason: str) -> None:
        """A study whose task file is broken goes to error/ as it is, with the reason."""
        job_id = task.id if task is not None else str(uuid.uuid4())
        if task is not None:
            task.error = reason
            task.info.fail_stage = "ROUTING"
            task.history.append(f"{now_text()} error: {reason}")
            write_task(ref.path, task, fsync=self.runtime.fsync)
        dest = self.runtime.store.folders["error"] / job_id
        durable_rename(ref.path, dest)
        claim.moved_to(dest)
        log.error("study moved to error", folder=ref.name, task_id=job_id, reason=reason)
        self.runtime.emit(
            TaskEvent(TaskEventType.MOVED_TO_ERROR, job_id, task.info.uid if task else "",
                      info=reason, tags=task.tags if task else {})
        )  # fmt: skip

    def _orphan(self, ref: StudyRef, now: float) -> None:
        """A folder a router made but never filled (it died, and its series went elsewhere)."""
        try:
            entries = [e for e in os.listdir(ref.path) if e != ".lock"]
            age = now - ref.path.stat().st_mtime
        except FileNotFoundError:
            return
        if not entries and age > ORPHAN_AGE:
            remove_tree(ref.path)


__all__ = ["RELEASE_STATE", "StudyReleaser", "collect_series", "study_task"]
