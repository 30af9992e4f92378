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
import time
from pathlib import Path
from typing import Any

from mercure.config import Module
from mercure.events import TaskEventType
from mercure.fsutil import atomic_write_bytes, safe_component
from mercure.processing import folders
from mercure.processing.base import FAIL_STAGE
from mercure.processing.finish import Finishing, dispatch_job_id
from mercure.processing.record import log_tail, new_record, read_record
from mercure.processing.results import ResultError, read_result
from mercure.processing.selection import parse_environment
from mercure.runners import (
    LAUNCH_PATIENCE,
    ProcessingRun,
    Runner,
    RunnerError,
    RunnerUnavailable,
    RunOutcome,
)

LOG_IN_EVENT = 64 * 1024
"""The end of a module's log carried by its ``process_module_complete`` event (the ledger and
the bookkeeper monitor keep it)."""

WAIT_SLICE = 1.0
"""Seconds of one ``Runner.wait`` call: how soon a stopping processor lets go of a run."""
CANCEL_REPEAT = 5.0
CANCEL_GIVE_UP = 300.0
"""Seconds after the first cancel at which a run that never reports its end is given up."""
RUNNER_WARN_INTERVAL = 60.0
LAUNCH_PAUSE_MAX = 60.0
"""Longest pause between two launches of a step whose runner is unavailable."""


class LaunchLater(Exception):
    """The step's runner is unavailable: the processor lets the job be for ``delay`` seconds."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay


class JobRun(Finishing):
    """Processes one claimed job in ``processing/``: its steps, then :class:`Finishing`."""

    # -- the job -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.task = self.store.read(self.ref)
        except FileNotFoundError:
            return  # moved on meanwhile
        except ValueError as exc:
            self._fail_unreadable(f"task.json cannot be read: {exc}")
            return
        self._bind_log(series_uid=self.task.info.uid)
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
            except RunnerUnavailable as exc:
                return self._launch_later(index, str(exc))
            except RunnerError as exc:
                return self._step_failed(index, f"could not be started: {exc}")
            except Exception as exc:
                return self._step_failed(
                    index, f"could not be started: {exc.__class__.__name__}: {exc}"
                )
            step.handle = handle
            step.state = "running"
            if step.unavailable_since is not None:
                # The module's timeout counts from its launch, not from the wait for the runner.
                step.unavailable_since = None
                step.error = None
                step.started_at = time.time()
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
        result: Any = None
        with contextlib.suppress(Exception):  # a malformed result.json is the problem above
            _present, result = read_result(folders.step_folders(self.ref.path, index).output)
        self._emit(
            TaskEventType.MODULE_FINISHED,
            step.module,
            step=index,
            exit_code=outcome.exit_code,
            duration=step.duration,
            log=outcome.log[-LOG_IN_EVENT:],
            result=result,
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

    def _launch_later(self, index: int, reason: str) -> bool:
        """Keep the step for another launch, or fail it once the runner stayed away too long."""
        step = self.record.steps[index]
        now = time.time()
        if step.unavailable_since is None:
            step.unavailable_since = now
        waited = now - step.unavailable_since
        if waited >= LAUNCH_PATIENCE:
            return self._step_failed(
                index,
                f"could not be started: the runner stayed unavailable for {waited:.0f} s: {reason}",
            )
        step.error = f"waiting for the runner: {reason}"
        self._save()
        delay = min(LAUNCH_PAUSE_MAX, max(2.0, waited / 2))
        self.log.warning(
            "runner unavailable; the module is launched again later",
            module=step.module,
            in_seconds=round(delay, 1),
            gives_up_in=round(LAUNCH_PATIENCE - waited),
            error=reason,
        )
        raise LaunchLater(delay, reason)

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


def _signal_text(code: int | None) -> str:
    if code is None or code <= 128:
        return ""
    with contextlib.suppress(ValueError):
        return f" (killed by {signal.Signals(code - 128).name})"
    return ""


__all__ = ["FAIL_STAGE", "JobRun", "dispatch_job_id"]
