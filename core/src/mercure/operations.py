"""Operator actions on the spool, shared by the command line and the web dashboard.

Each action checks what it may do, claims the job so that no service works on it at the same
time, changes the spool atomically and then records an event with the operator's name
(``extra["operator"]``) and where it came from (``extra["by"]``: ``cli``, ``web``), so the
ledger's history says who retried, discarded, suspended or resumed what. A refused action
raises :class:`OperationError` with a message for the operator and changes nothing.

Forcing a study asks the router to release a study still being collected (mercure's
``.force-complete`` marker); the router releases it on its next pass, under its own claim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mercure.controls import CONTROLLED, Controlled, halt_file, resume, suspend
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.incoming import instance_files
from mercure.jobs.store import JobRef, JobStore
from mercure.jobs.studies import OpenStudy, StudyStore
from mercure.jobs.task import Task
from mercure.processing.folders import processes_of, reset_for_retry
from mercure.processing.job import FAIL_STAGE
from mercure.processing.record import new_record, read_record, write_record
from mercure.services.runtime import Runtime


class OperationError(Exception):
    """An operator action was refused: the message says why and what to do."""


@dataclass(frozen=True)
class Outcome:
    """What an action did, in one sentence for the operator."""

    message: str
    task_id: str = ""


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _error_job(store: JobStore, task_id: str, verb: str) -> JobRef:
    ref = store.find(task_id)
    if ref is None:
        raise OperationError(f"no job '{task_id}' in any state folder")
    if ref.state != "error":
        raise OperationError(
            f"job {ref.id} is in {ref.state}/, not error/; only failed jobs can be {verb}"
        )
    return ref


def retry_job(runtime: Runtime, task_id: str, *, operator: str, by: str = "cli") -> Outcome:
    """Move a job from error/ back to outgoing/ (tries reset; delivered files stay done), or a
    job whose processing failed back to processing/ for a new attempt from its kept inputs."""
    store = runtime.store
    ref = _error_job(store, task_id, "retried")
    claim = store.claim(ref)
    if claim is None:
        raise OperationError(f"job {ref.id} is held by another process; try again in a moment")
    with claim:
        try:
            task = store.read(ref)
        except (OSError, ValueError) as exc:
            raise OperationError(
                f"job {ref.id}: task.json cannot be read ({exc}); repair it, then retry"
            ) from None
        if failed_in_processing(ref, task):
            attempt = retry_processing(store, ref, task)
            store.move(ref, "processing", claim)
            runtime.emit(
                TaskEvent(
                    TaskEventType.MANUAL_RETRY,
                    ref.id,
                    task.info.uid,
                    " -> ".join(p.module_name for p in processes_of(task)),
                    info=f"processing attempt {attempt}",
                    extra={"operator": operator, "by": by},
                )
            )
            return Outcome(
                f"job {ref.id} moved back to processing/ (attempt {attempt}, from its kept "
                "inputs); the processor runs it on its next pass",
                ref.id,
            )
        d = task.dispatch_state
        if d is None:
            raise OperationError(f"job {ref.id} has no dispatch section; it cannot be sent again")
        task.history.append(f"{_stamp()} manual retry after: {task.error} (by {operator})")
        task.error = None
        d.retries = 0
        d.next_retry_at = 0
        store.write(ref, task)
        store.move(ref, "outgoing", claim)
    runtime.emit(
        TaskEvent(
            TaskEventType.MANUAL_RETRY,
            ref.id,
            task.info.uid,
            ",".join(task.target_names),
            extra={"operator": operator, "by": by},
        )
    )
    return Outcome(
        f"job {ref.id} moved back to outgoing/; the dispatcher sends it on its next pass", ref.id
    )


def discard_job(
    runtime: Runtime, task_id: str, *, operator: str, reason: str = "", by: str = "cli"
) -> Outcome:
    """Give up on a job in error/: it moves to discard/ and is kept for the retention period."""
    store = runtime.store
    ref = _error_job(store, task_id, "discarded")
    claim = store.claim(ref)
    if claim is None:
        raise OperationError(f"job {ref.id} is held by another process; try again in a moment")
    task: Task | None
    with claim:
        try:
            task = store.read(ref)
        except (OSError, ValueError):
            task = None  # discarded as it is: the reason it could not be read stays visible
        if task is not None:
            task.history.append(
                f"{_stamp()} discarded by {operator}"
                + (f": {reason}" if reason else "")
                + (f" (error was: {task.error.splitlines()[0]})" if task.error else "")
            )
            store.write(ref, task)
        store.move(ref, "discard", claim)
    runtime.emit(
        TaskEvent(
            TaskEventType.MANUAL_DISCARD,
            ref.id,
            task.info.uid if task else "",
            info=reason,
            extra={"operator": operator, "by": by},
        )
    )
    return Outcome(
        f"job {ref.id} moved to discard/; it is removed after the retention period", ref.id
    )


def _controlled(what: str) -> Controlled:
    if what not in CONTROLLED:
        raise OperationError(f"cannot suspend '{what}'; choose {' or '.join(CONTROLLED)}")
    return what


def suspend_service(
    runtime: Runtime, what: str, *, operator: str, reason: str = "", by: str = "cli"
) -> Outcome:
    """Write mercure's HALT file: no new delivery (or processing job) starts; running ones
    finish. Every dispatcher or processor on the spool obeys within one scan interval."""
    name = _controlled(what)
    if not suspend(runtime.config, name, reason, by=operator):
        return Outcome(f"{name} was suspended already")
    runtime.emit(
        TaskEvent(
            TaskEventType.SUSPENDED,
            "",
            info=reason,
            extra={"service": name, "by": by, "operator": operator},
        )
    )
    return Outcome(f"{name} suspended ({halt_file(runtime.config, name)})")


def resume_service(runtime: Runtime, what: str, *, operator: str, by: str = "cli") -> Outcome:
    """Remove the HALT file: dispatching or processing goes on where it stopped."""
    name = _controlled(what)
    if not resume(runtime.config, name):
        return Outcome(f"{name} was not suspended")
    runtime.emit(
        TaskEvent(
            TaskEventType.RESUMED, "", extra={"service": name, "by": by, "operator": operator}
        )
    )
    return Outcome(f"{name} resumed")


def study_store(runtime: Runtime) -> StudyStore:
    """The ``studies/`` folder of ``runtime``'s spool."""
    return StudyStore(runtime.config.folder("studies"), runtime.store, fsync=runtime.fsync)


def force_complete_study(
    runtime: Runtime,
    study: str,
    *,
    rule: str | None = None,
    operator: str,
    by: str = "cli",
) -> list[Outcome]:
    """Ask the router to release the study ``study`` (StudyInstanceUID or study job id) now,
    with the series that arrived (mercure's ``.force-complete``); one outcome per study rule
    collecting it (``rule``: only that rule's). Recorded as ``study_force`` with the operator.
    """
    store = study_store(runtime)
    found = [
        s
        for s in store.open_studies()
        if study in (s.study_uid, s.task_id) and (rule is None or s.rule == rule)
    ]
    if not found:
        raise OperationError(
            f"no study '{study}'{f' of rule {rule}' if rule else ''} is being collected; "
            "`mercure study list` shows those that are (a released study is a job: "
            "`mercure queue`)"
        )
    outcomes = []
    for open_study in found:
        try:
            store.request_force(open_study.ref)
        except FileNotFoundError:
            raise OperationError(
                f"study {open_study.study_uid} (rule {open_study.rule}) was released meanwhile: "
                f"it is job {open_study.task_id} now"
            ) from None
        runtime.emit(
            TaskEvent(
                TaskEventType.STUDY_FORCE_REQUESTED,
                open_study.task_id,
                open_study.study_uid,
                info=f"completion forced by {operator}",
                rule=open_study.rule,
                extra={"operator": operator, "by": by},
            )
        )
        outcomes.append(
            Outcome(
                f"study {open_study.study_uid} (job {open_study.task_id}, rule "
                f"{open_study.rule}): completion requested; the router releases it on its next "
                "pass",
                open_study.task_id,
            )
        )
    return outcomes


def failed_in_processing(ref: JobRef, task: Task) -> bool:
    """A job in error/ whose processing failed (its inputs are kept to run it again)."""
    try:
        record = read_record(ref.path)
    except ValueError:
        record = None
    if record is not None:
        return record.phase == "failed"
    return task.info.fail_stage == FAIL_STAGE and bool(processes_of(task))


def retry_processing(store: JobStore, ref: JobRef, task: Task) -> int:
    """Reset a failed processing job for a new attempt from its kept inputs."""
    if not instance_files(ref.path):
        raise OperationError(
            f"job {ref.id} has no input instances left; it cannot be processed again"
        )
    try:
        old = read_record(ref.path)
    except ValueError:
        old = None
    attempt = (old.attempt + 1) if old else 1
    record = new_record([p.module_name for p in processes_of(task)], attempt)
    if old is not None:
        record.earlier_attempts = [
            *old.earlier_attempts,
            f"attempt {old.attempt}: {(old.failure or old.phase).splitlines()[0]}",
        ]
    reset_for_retry(ref.path)
    write_record(ref.path, record)
    task.history.append(
        f"{_stamp()} manual retry of processing after: "
        f"{(task.error or '').splitlines()[0] if task.error else 'error'}"
    )
    task.error = None
    task.info.fail_stage = None
    store.write(ref, task)
    return attempt


__all__ = [
    "OpenStudy",
    "OperationError",
    "Outcome",
    "discard_job",
    "failed_in_processing",
    "force_complete_study",
    "resume_service",
    "retry_job",
    "retry_processing",
    "study_store",
    "suspend_service",
]
