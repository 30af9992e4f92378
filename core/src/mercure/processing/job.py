"""One processing job, driven step by step from its record (see :mod:`.record`).

The processor calls :meth:`JobRun.run` while it holds the job's claim. Every state change
is written to the record before the next action, so the call can be cut off at any line
(kill -9) and a later call, in any process, carries on: it re-attaches to a launched module
through its handle, never launches it twice, and finishes or fails the job exactly once.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mercure.config import Module
from mercure.events import TaskEvent, TaskEventType
from mercure.fsutil import atomic_write_bytes, safe_component
from mercure.jobs.claims import Claim
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskDispatch, TaskProcessing
from mercure.logs import get_logger
from mercure.processing import folders
from mercure.processing.record import (
    ProcessingRecord,
    StepRecord,
    log_tail,
    new_record,
    read_record,
    write_record,
)
from mercure.processing.results import ResultError, completion_notice, decide_routing, read_result
from mercure.processing.selection import Runners, parse_environment
from mercure.runners import ProcessingRun, Runner, RunnerError, RunOutcome
from mercure.services.runtime import Runtime
from mercure.tags import read_tags

FAIL_STAGE = "PROCESSING"
WAIT_SLICE = 1.0
"""Seconds of one ``Runner.wait`` call: how soon a stopping processor lets go of a run."""
CANCEL_REPEAT = 5.0
CANCEL_GIVE_UP = 300.0
"""Seconds after the first cancel at which a run that never reports its end is given up."""
RUNNER_WARN_INTERVAL = 60.0
DISPATCH_NAMESPACE = uuid.UUID("8f0b6c0e-5d0c-4d4e-9a55-3c3f1b2f6d11")


def dispatch_job_id(task_id: str, attempt: int) -> str:
    """The id of the outgoing job of a processing job: the same on every try, so never two."""
    return str(uuid.uuid5(DISPATCH_NAMESPACE, f"{task_id}/{attempt}"))


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class JobRun:
    """Processes one claimed job in ``processing/``."""

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
        self.task: Task
        self.record: ProcessingRecord
        self.processes: list[TaskProcessing] = []

    # -- the job -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.task = self.store.read(self.ref)
        except FileNotFoundError:
            return  # moved on meanwhile
        except ValueError as exc:
            self._fail_unreadable(f"task.json cannot be read: {exc}")
            return
        self.log = self.log.bind(series_uid=self.task.info.uid)
        self.processes = folders.processes_of(self.task)
        try:
            record = read_record(self.ref.path)
        except ValueError as exc:
            self._fail_unreadable(f"processing.json cannot be read: {exc}")
            return
        if not self.processes:
            self.record = record or new_record([])
            self._fail("task.json has no process section: no module to run")
            return
        if record is None:
            record = new_record([p.module_name for p in self.processes])
            self.record = record
            self._save()
        self.record = record
        if len(record.steps) != len(self.processes):
            self._fail("processing.json does not match the modules of task.json")
            return
        if record.phase == "failed":
            self._fail(record.failure or "processing failed")
            return
        if record.phase == "running":
            while (index := record.current) is not None:
                if not self._step(index):
                    return
            record.phase = "finishing"
            self._save()
        self._finish()

    # -- one step ----------------------------------------------------------------------------

    def _step(self, index: int) -> bool:
        """Advance step ``index`` as far as possible; False to stop (detached or failed)."""
        step = self.record.steps[index]
        module = self._module(index)
        if module is None:
            self._fail(
                f"module '{step.module}' of step {index + 1} is not in the configuration any "
                "more and task.json has no copy of it"
            )
            return False
        if step.state == "pending":
            if self.stop.is_set():
                return False
            if index == 0:
                self.log.info(
                    "processing started", modules=self._modules(), attempt=self.record.attempt
                )
                self._emit(TaskEventType.PROCESSING_STARTED, self._modules())
            folders.prepare_step(
                self.ref.path,
                self.task,
                index,
                extra_tags=list(self.config.dicom_receiver.additional_tags),
                fsync=self.runtime.fsync,
            )
            step.state = "launching"
            task_part = re.sub(r"[^A-Za-z0-9_-]", "_", self.task.id)[:60]
            step.run_id = f"{task_part}-a{self.record.attempt}-s{index}"
            step.runner = self.runners.default_name
            step.started_at = time.time()
            self._save()
            self.log.info("module starting", module=step.module, step=index + 1, runner=step.runner)
            self._emit(TaskEventType.MODULE_STARTED, step.module, step=index)
        if step.state == "launching":
            try:
                runner = self.runners.get(step.runner)
                run = self._run(index, module)
                handle = runner.launch(run)
            except RunnerError as exc:
                return self._step_failed(index, f"could not be started: {exc}")
            except Exception as exc:
                return self._step_failed(
                    index, f"could not be started: {exc.__class__.__name__}: {exc}"
                )
            step.handle = handle
            step.state = "running"
            self._save()
        if step.state == "running":
            try:
                runner = self.runners.get(step.runner)
            except RunnerError as exc:
                return self._step_failed(index, str(exc))
            assert step.handle is not None
            outcome = self._follow(index, module, runner, step.handle)
            if outcome is None:
                self.log.info(
                    "processor stopping; the module keeps running and is followed again "
                    "on the next start",
                    module=step.module,
                )
                return False
            self._ended(index, outcome)
            try:
                runner.cleanup(step.handle)
            except Exception as exc:
                self.log.warning("runner cleanup failed", module=step.module, error=str(exc))
        if step.state == "failed":
            self._fail(self.record.failure or f"module '{step.module}' failed")
            return False
        return step.state == "done"

    def _module(self, index: int) -> Module | None:
        """The module's definition: the configuration's (it may have been fixed for a retry)."""
        process = self.processes[index]
        return self.config.modules.get(process.module_name) or process.module_config

    def _run(self, index: int, module: Module) -> ProcessingRun:
        step = self.record.steps[index]
        dirs = folders.step_folders(self.ref.path, index)
        try:
            environment = parse_environment(module.environment)
        except ValueError as exc:
            raise RunnerError(f"module '{step.module}': environment {exc}") from None
        persistence = None
        if module.requires_persistence:
            name = str((module.model_extra or {}).get("persistence_folder_name") or step.module)
            persistence = Path(self.config.persistence_folder) / safe_component(name)
        return ProcessingRun(
            task_id=self.task.id,
            module_name=step.module,
            module=module,
            input_folder=dirs.input.resolve(),
            output_folder=dirs.output.resolve(),
            settings=dict(self.processes[index].settings),
            step=index,
            environment=environment,
            persistence_folder=persistence,
            timeout=float(module.timeout),
            allow_root=bool(self.config.support_root_modules),
            run_id=step.run_id,
            run_folder=dirs.run.resolve(),
        )

    def _follow(
        self, index: int, module: Module, runner: Runner[Any], handle: str
    ) -> RunOutcome | None:
        """Wait for the run, enforcing the timeout; None if the processor is stopping."""
        step = self.record.steps[index]
        timeout = float(module.timeout)
        started = step.started_at or time.time()
        last_cancel = 0.0
        last_warning = 0.0
        while not self.stop.is_set():
            now = time.time()
            if step.cancel_requested_at is None and timeout and now >= started + timeout:
                step.cancel_requested_at = now
                step.cancel_reason = "timeout"
                self._save()
                self.log.warning(
                    "module timed out; stopping it", module=step.module, timeout=timeout
                )
            if step.cancel_requested_at is not None:
                if now - step.cancel_requested_at > CANCEL_GIVE_UP:
                    return RunOutcome(
                        exit_code=None,
                        error=f"the runner did not report the end of the run "
                        f"{CANCEL_GIVE_UP:.0f} s after it was asked to stop it",
                    )
                if now - last_cancel >= CANCEL_REPEAT:
                    last_cancel = now
                    try:
                        runner.cancel(handle)
                    except Exception as exc:
                        self.log.warning(
                            "cancelling the run failed", module=step.module, error=str(exc)
                        )
            slice_ = WAIT_SLICE
            if step.cancel_requested_at is None and timeout:
                slice_ = max(0.05, min(WAIT_SLICE, started + timeout - now))
            try:
                outcome = runner.wait(handle, slice_)
            except RunnerError as exc:
                if now - last_warning >= RUNNER_WARN_INTERVAL:
                    last_warning = now
                    self.log.warning(
                        "cannot follow the module's run; trying again",
                        module=step.module,
                        error=str(exc),
                    )
                self.stop.wait(WAIT_SLICE)
                continue
            if outcome is not None:
                return outcome
        return None

    def _ended(self, index: int, outcome: RunOutcome) -> None:
        """Record how a run ended and whether its output can be used."""
        step = self.record.steps[index]
        step.finished_at = time.time()
        step.exit_code = outcome.exit_code
        step.error = outcome.error
        self._keep_log(index, outcome.log)
        where = self._where(index)
        problem: str | None
        if step.cancel_reason == "timeout":
            module = self._module(index)
            limit = float(module.timeout) if module else 0.0
            problem = f"did not finish within its timeout of {limit:g} s and was stopped"
        elif outcome.error:
            problem = f"did not run to completion: {outcome.error}"
        elif outcome.exit_code != 0:
            problem = f"exited with code {outcome.exit_code}{_signal_text(outcome.exit_code)}"
        else:
            problem = self._check_output(index)
        self._emit(
            TaskEventType.MODULE_FINISHED,
            step.module,
            step=index,
            exit_code=outcome.exit_code,
            duration=step.duration,
        )
        if problem is None:
            step.state = "done"
            self._save()
            self.log.info(
                "module finished",
                module=step.module,
                step=index + 1,
                outputs=step.outputs,
                duration=round(step.duration or 0, 2),
            )
            return
        step.state = "failed"
        reason = f"{where} {problem}"
        if step.log_tail:
            reason += f"\nlog tail:\n{step.log_tail}"
        elif self.config.processing_logs.discard_logs:
            reason += " (log discarded: processing_logs.discard_logs)"
        self.record.failure = reason
        self.record.failed_step = index
        self._save()

    def _step_failed(self, index: int, problem: str) -> bool:
        step = self.record.steps[index]
        step.state = "failed"
        step.finished_at = time.time()
        step.error = problem
        self.record.failure = f"{self._where(index)} {problem}"
        self.record.failed_step = index
        self._save()
        self._fail(self.record.failure)
        return False

    def _where(self, index: int) -> str:
        return (
            f"processing failed at step {index + 1} of {len(self.record.steps)}: module "
            f"'{self.record.steps[index].module}'"
        )

    def _check_output(self, index: int) -> str | None:
        """None if the step's output is usable; else what is wrong with it."""
        step = self.record.steps[index]
        dirs = folders.step_folders(self.ref.path, index)
        if not dirs.output.is_dir():
            return "removed its output folder"
        folders.ensure_task_file(dirs)
        if self.runtime.fsync:
            folders.sync_tree(dirs.output)  # the results must survive a power loss from here on
        try:
            _present, output = read_result(dirs.output)
        except ResultError as exc:
            return f"wrote a malformed result.json: {exc}"
        step.output = output
        if not folders.written_files(dirs.output):
            return "exited with code 0 but wrote nothing to its output folder (no DICOM files)"
        dicoms = folders.dicom_outputs(dirs.output)
        for path in dicoms:
            problem = folders.check_dicom(path)
            if problem is not None:
                return f"wrote {path.name}, which is {problem}"
        step.outputs = len(dicoms)
        if index + 1 < len(self.record.steps) and not dicoms:
            return (
                "wrote no DICOM files, so the next module "
                f"'{self.record.steps[index + 1].module}' would get no input"
            )
        return None

    def _keep_log(self, index: int, log: str) -> None:
        step = self.record.steps[index]
        settings = self.config.processing_logs
        if settings.discard_logs:
            step.log_tail = ""
            return
        step.log_tail = log_tail(log)
        name = f"{self.record.attempt}.{index}.{safe_component(step.module)}"
        data = log.encode("utf-8", errors="replace")
        logs = self.ref.path / folders.LOGS
        logs.mkdir(exist_ok=True)
        atomic_write_bytes(logs / f"{name}.log", data, fsync=self.runtime.fsync)
        step.log_file = f"{folders.LOGS}/{name}.log"
        if settings.logs_file_store:
            store = Path(settings.logs_file_store)
            try:
                folder = store / safe_component(self.task.id)
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(folder / f"{name}.txt", data, fsync=self.runtime.fsync)
            except OSError as exc:
                self.log.warning(
                    "module log not written to logs_file_store", folder=str(store), error=str(exc)
                )

    # -- the end -----------------------------------------------------------------------------

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


def _signal_text(code: int | None) -> str:
    if code is None or code <= 128:
        return ""
    with contextlib.suppress(ValueError):
        return f" (killed by {signal.Signals(code - 128).name})"
    return ""


__all__ = ["FAIL_STAGE", "JobRun", "StepRecord", "dispatch_job_id"]
