"""The end of a successful processing job: results collected, handed on, the job moved.

Every step is repeatable and its progress is in the record (``dispatch_targets``,
``result_stage``, ``notified``, ``phase``), so a processor killed at any point finishes the
job on its next pass without losing the results or dispatching them twice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.task import Task, TaskDispatch, TaskProcessing
from mercure.processing import folders
from mercure.processing.base import JobBase, now_text
from mercure.processing.results import completion_notice, decide_routing
from mercure.tags import read_tags

DISPATCH_NAMESPACE = uuid.UUID("8f0b6c0e-5d0c-4d4e-9a55-3c3f1b2f6d11")


def dispatch_job_id(task_id: str, attempt: int) -> str:
    """The id of the outgoing job of a processing job: the same on every try, so never two."""
    return str(uuid.uuid5(DISPATCH_NAMESPACE, f"{task_id}/{attempt}"))


class Finishing(JobBase):
    """Collects a processed job's results and moves it on (see the module docstring)."""

    def _outputs(self) -> list[tuple[str, Any]]:
        return [(s.module, s.output) for s in self.record.steps]

    def _finish(self) -> None:
        """Collect the results, hand them to the dispatcher or to success/; repeatable."""
        record = self.record
        job = self.ref.path
        if record.phase == "finishing":
            if record.dispatch_targets is None:
                decision = decide_routing(
                    self.config,
                    self.task.info.applied_rule,
                    self.task.target_names,
                    record.steps[-1].output,
                )
                record.dispatch_targets = decision.targets
                if decision.note:
                    record.notes.append(decision.note)
                if decision.targets:
                    record.dispatch_job = dispatch_job_id(self.task.id, record.attempt)
                self._save()
            if record.result_stage is None:
                retain = self.processes[0].retain_input_images
                last = folders.step_folders(job, len(record.steps) - 1)
                chain = self._outputs() if len(record.steps) > 1 else None
                retained = folders.step_folders(job, 0).input if retain else None
                notes = folders.build_result(
                    job,
                    last,
                    chain_results=chain,
                    retained_from=retained,
                    fsync=self.runtime.fsync,
                )
                record.notes.extend(notes)
                record.result_stage = "built"
                self._save()
            if record.dispatch_targets and not self._dispatch():
                return
            if record.result_stage == "built":
                folders.clear_inputs(job, fsync=self.runtime.fsync)
                record.result_stage = "cleared"
                self._save()
            folders.place_result(job, fsync=self.runtime.fsync)
            self._write_final_task()
            if not record.notified:
                self._notify_completion()
                record.notified = True
                self._save()
            record.phase = "finished"
            record.finished_at = time.time()
            self._save()
        self.store.move(self.ref, "success", self.claim)
        duration = (record.finished_at or time.time()) - record.started_at
        self.log.info(
            "processing finished",
            modules=self._modules(),
            dispatched_as=record.dispatch_job,
            targets=record.dispatch_targets,
            duration=round(duration, 2),
        )
        self._emit(TaskEventType.PROCESSING_FINISHED, self._modules(), duration=duration)
        if not record.dispatch_targets:
            self._emit(TaskEventType.COMPLETED, "", duration=self._age())

    def _dispatch(self) -> bool:
        """Create the outgoing job of the results (idempotent); False if there is nothing."""
        record = self.record
        assert record.dispatch_job is not None and record.dispatch_targets
        if self.store.find_exact(record.dispatch_job) is not None:
            return True
        source = self.ref.path / folders.RESULT
        if record.result_stage == "cleared" or not source.is_dir():
            source = self.ref.path
        files = folders.dicom_outputs(source)
        if not files:
            self._fail(
                f"processing finished, but the module(s) {self._modules()} wrote no DICOM "
                f"files, so there is nothing to send to {', '.join(record.dispatch_targets)}"
            )
            return False
        try:
            out_tags = read_tags(str(files[0]), list(self.config.dicom_receiver.additional_tags))
        except Exception:
            out_tags = {}
        for key in folders.RECEIVER_TAGS:
            if key in self.task.tags:
                out_tags.setdefault(key, self.task.tags[key])
        targets = record.dispatch_targets
        processes = self._processes_with_outputs()
        child = Task(
            info=self.task.info.model_copy(deep=True),
            id=record.dispatch_job,
            dispatch=TaskDispatch(
                target_name=targets[0] if len(targets) == 1 else list(targets),
                series_uid=out_tags.get("SeriesInstanceUID") or self.task.info.uid,
            ),
            process=processes[0] if len(processes) == 1 else processes,
            study=self.task.study,
            created_at=self.task.created_at or time.time(),
            tags=out_tags,
            parent_id=self.task.id,
            history=[f"{now_text()} results of processing job {self.task.id} ({self._modules()})"],
        )
        series_uid = out_tags.get("SeriesInstanceUID") or self.task.info.uid
        ref = self.store.create("outgoing", child, files)
        self.log.info(
            "results queued for dispatch",
            dispatch_job=ref.id,
            targets=targets,
            instances=len(files),
        )
        self.runtime.emit(
            TaskEvent(
                TaskEventType.ROUTED,
                ref.id,
                series_uid,
                ", ".join(targets),
                len(files),
                info=f"results of processing job {self.task.id}",
                rule=self.task.info.applied_rule or "",
                tags=out_tags,
                extra={"parent_id": self.task.id},
            )
        )
        if self.on_job_created is not None:
            self.on_job_created()
        return True

    def _processes_with_outputs(self) -> list[TaskProcessing]:
        result = []
        for process, step in zip(self.processes, self.record.steps, strict=True):
            result.append(process.model_copy(update={"output": step.output}))
        return result

    def _write_final_task(self) -> None:
        task = self.task
        processes = self._processes_with_outputs()
        task.process = processes[0] if len(processes) == 1 else processes
        for note in self.record.notes:
            entry = f"{now_text()} {note}"
            if entry not in task.history:
                task.history.append(entry)
        if self.record.dispatch_job:
            task.history.append(f"{now_text()} results sent on as job {self.record.dispatch_job}")
        task.error = None
        self.store.write(self.ref, task)

    def _notify_completion(self) -> None:
        """mercure: a ``process`` job notifies completion; the dispatcher does for the rest."""
        if self.record.dispatch_targets:
            return
        for rule_name in self._rules():
            details, always = completion_notice(self.config, self.task, rule_name)
            self.runtime.notify_rule(
                "completion", rule_name, self.task.id, self.task.tags, details, always=always
            )


__all__ = ["Finishing", "dispatch_job_id"]
