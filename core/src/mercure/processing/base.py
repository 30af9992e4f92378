"""What every part of a processing job's run shares: its state, events, and failing it.

:class:`JobBase` holds the claimed job, its task and record, and the few actions both the
steps (:mod:`.job`) and the end (:mod:`.finish`) need: saving the record, emitting events,
and moving a failed job to ``error/`` (repeatable after a crash).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.claims import Claim
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskProcessing
from mercure.logs import get_logger
from mercure.processing.record import ProcessingRecord, write_record
from mercure.processing.selection import Runners
from mercure.services.runtime import Runtime

FAIL_STAGE = "PROCESSING"


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class JobBase:
    """One claimed job in ``processing/`` and its processing record."""

    log: Any
    task: Task
    record: ProcessingRecord

    def __init__(
        self,
        runtime: Runtime,
        runners: Runners,
        ref: JobRef,
        claim: Claim,
        stop: threading.Event,
        on_job_created: Any = None,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.store = runtime.store
        self.runners = runners
        self.ref = ref
        self.claim = claim
        self.stop = stop
        self.on_job_created = on_job_created
        self.log = get_logger("mercure.processor").bind(task_id=ref.id)
        self.processes: list[TaskProcessing] = []

    def _bind_log(self, **context: Any) -> None:
        self.log = self.log.bind(**context)

    def _fail(self, reason: str) -> None:
        """Move the job, with its original inputs, to error/ (repeatable)."""
        record = self.record
        if record.phase != "failed":
            record.phase = "failed"
            record.failure = reason
            record.finished_at = time.time()
            self._save()
        task = self.task
        task.error = reason
        task.info.fail_stage = FAIL_STAGE
        first_line = reason.splitlines()[0] if reason else reason
        entry = f"{now_text()} error: {first_line}"
        if not task.history or task.history[-1] != entry:
            task.history.append(entry)
        self.store.write(self.ref, task)
        self.store.move(self.ref, "error", self.claim)
        index = record.failed_step
        module = record.steps[index].module if index is not None else self._modules()
        exit_code = record.steps[index].exit_code if index is not None else None
        self.log.error(
            "processing failed; job moved to error",
            module=module,
            exit_code=exit_code,
            reason=first_line,
        )
        duration = (record.finished_at or time.time()) - record.started_at
        self._emit(
            TaskEventType.PROCESSING_FAILED,
            module,
            info=reason,
            step=index,
            exit_code=exit_code,
            duration=duration,
        )
        self._emit(TaskEventType.MOVED_TO_ERROR, module, info=reason)
        for rule_name in self._rules():
            self.runtime.notify_rule("error", rule_name, task.id, task.tags, reason)

    def _fail_unreadable(self, reason: str) -> None:
        """A job whose task file or record cannot be read goes to error/ as it is."""
        self.store.move(self.ref, "error", self.claim)
        self.log.error("job moved to error", reason=reason)
        self.runtime.emit(
            TaskEvent(
                TaskEventType.MOVED_TO_ERROR,
                self.ref.id,
                info=reason,
                extra={"service": "processor"},
            )
        )

    # -- small helpers -----------------------------------------------------------------------

    def _save(self) -> None:
        write_record(self.ref.path, self.record, fsync=self.runtime.fsync)

    def _modules(self) -> str:
        return " -> ".join(p.module_name for p in self.processes)

    def _rules(self) -> list[str]:
        rules = self.task.info.triggered_rules
        return list(rules) if isinstance(rules, dict) else []

    def _age(self) -> float:
        return time.time() - self.task.created_at if self.task.created_at else 0.0

    def _emit(self, kind: TaskEventType, module: str, info: str = "", **extra: Any) -> None:
        count = 0
        with contextlib.suppress(OSError):
            count = sum(1 for _ in self.ref.path.glob("*.dcm"))
        self.runtime.emit(
            TaskEvent(
                kind,
                self.ref.id,
                self.task.info.uid,
                module,
                count,
                info=info,
                rule=self.task.info.applied_rule or "",
                tags=self.task.tags,
                extra={"service": "processor", **extra},
            )
        )


__all__ = ["FAIL_STAGE", "JobBase", "now_text"]
