"""The processor: runs the processing modules of the jobs in ``processing/``.

Each pass lists ``processing/`` (oldest job first, in arrival order), claims jobs with an
exclusive lock (several processor processes on one spool never take the same job, and the
lock of a processor that died is free again at once) and hands each claimed job to a worker
thread (``processor_workers``), which runs its modules through the configured runner
(:mod:`mercure.processing.job`). A ``HALT`` file in ``processing/`` (mercure's suspend switch)
stops new jobs from being taken; runs in progress go on.

A job whose processing raised an unexpected error (a full disk, a bug) stays where it is,
claimed by nobody, and is tried again after a pause: its record says where it stood.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from mercure.controls import is_suspended
from mercure.jobs.claims import Claim
from mercure.jobs.store import JobRef
from mercure.priorities import OffpeakWindow, Priority, PriorityPicker, rule_priority
from mercure.processing.job import JobRun, LaunchLater
from mercure.processing.selection import Runners
from mercure.services.base import Service
from mercure.services.runtime import Runtime

RETRY_PAUSE = 30.0
"""Seconds before a job whose processing raised unexpectedly is taken again."""


class Processor(Service):
    """Claims jobs in ``processing/`` and runs them, ``processor_workers`` at a time."""

    name = "processor"

    def __init__(self, runtime: Runtime) -> None:
        # mercure's processor has no interval of its own: it uses the dispatcher's.
        super().__init__(runtime.config.dispatcher_scan_interval)
        self.runtime = runtime
        self.workers = runtime.config.processor_workers
        self.runners = Runners(runtime.config, runtime.plugins, runtime.context)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="process")
        self.in_flight: dict[str, Future[None]] = {}
        self.pause_until: dict[str, float] = {}
        #: Called when the results of a job were queued in outgoing/ (wakes a dispatcher).
        self.on_jobs_created: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._halted = False
        self.picker = PriorityPicker()
        #: The clock of the off-peak check (tests set it).
        self.clock = time.time
        # job id -> (applied rule, triggered rules): a job's rules never change, its priority
        # follows the running configuration.
        self._rules: dict[str, tuple[str | None, object]] = {}

    @property
    def window(self) -> OffpeakWindow:
        """The off-peak window of the running configuration (it may be reloaded)."""
        return OffpeakWindow.from_config(self.runtime.config)

    @property
    def folder(self) -> os.PathLike[str]:
        return self.runtime.store.folders["processing"]

    def halted(self) -> bool:
        halted = is_suspended(self.runtime.config, "processing")
        if halted != self._halted:
            self._halted = halted
            if halted:
                self.log.warning("processing suspended: HALT file present", folder=str(self.folder))
            else:
                self.log.info("processing resumed: HALT file removed")
        return halted

    def run_once(self) -> int:
        with self._lock:
            for job_id in [i for i, f in self.in_flight.items() if f.done()]:
                del self.in_flight[job_id]
            free = self.workers - len(self.in_flight)
        if free <= 0 or self.halted():
            return 0
        store = self.runtime.store
        now = time.time()
        candidates = []
        for ref in store.list(["processing"]):
            if ref.id in self.in_flight or self.pause_until.get(ref.id, 0.0) > now:
                continue
            try:
                arrived = ref.path.stat().st_mtime
            except FileNotFoundError:
                continue
            candidates.append((arrived, ref.id, ref))
        candidates.sort(key=lambda c: (c[0], c[1]))
        started = 0
        for ref in self._by_priority([ref for _a, _n, ref in candidates]):
            if free <= 0 or self.stop_event.is_set():
                break
            if store.is_open(ref):
                continue
            claim = store.claim(ref)
            if claim is None:
                continue  # another processor has it (it is followed there)
            if not ref.path.is_dir():
                claim.release()
                continue
            with self._lock:
                self.in_flight[ref.id] = self.pool.submit(self._process, ref, claim)
            free -= 1
            started += 1
        known = {ref.id for _a, _n, ref in candidates}
        for job_id in [j for j in self.pause_until if j not in known]:
            del self.pause_until[job_id]
        for job_id in [j for j in self._rules if j not in known and j not in self.in_flight]:
            del self._rules[job_id]
        return started

    def _priority(self, ref: JobRef) -> Priority:
        rules = self._rules.get(ref.id)
        if rules is None:
            try:
                task = self.runtime.store.read(ref)
            except (OSError, ValueError):
                return "urgent"  # unreadable: let the job run fail it with the reason now
            rules = (task.info.applied_rule, task.info.triggered_rules)
            self._rules[ref.id] = rules
        return rule_priority(self.runtime.config, rules[0], rules[1])

    def _by_priority(self, refs: list[JobRef]) -> Iterator[JobRef]:
        """Oldest first within a priority; urgent on two picks of three; offpeak in its window
        only (mercure's ``prioritize_tasks``)."""
        offpeak_open = self.window.contains(self.clock())
        urgent: list[JobRef] = []
        normal: list[JobRef] = []
        for ref in refs:
            prio = self._priority(ref)
            if prio == "urgent":
                urgent.append(ref)
            elif prio == "normal" or offpeak_open:
                normal.append(ref)
        while (ref := self.picker.pick(urgent, normal)) is not None:
            yield ref

    def _process(self, ref: JobRef, claim: Claim) -> None:
        try:
            with claim:
                JobRun(
                    self.runtime,
                    self.runners,
                    ref,
                    claim,
                    self.stop_event,
                    on_job_created=self._jobs_created,
                ).run()
        except LaunchLater as later:
            self.pause_until[ref.id] = time.time() + later.delay
        except Exception:
            self.log.exception(
                "processing a job failed unexpectedly; it is tried again later",
                task_id=ref.id,
                in_seconds=RETRY_PAUSE,
            )
            self.pause_until[ref.id] = time.time() + RETRY_PAUSE
        finally:
            self.wake_event.set()  # a worker is free: take the next job now

    def _jobs_created(self) -> None:
        for callback in self.on_jobs_created:
            try:
                callback()
            except Exception as exc:
                self.log.warning("waking the dispatcher failed", error=str(exc))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.runners.close()
