"""The dispatcher: delivers jobs in ``outgoing/`` to their targets.

Each job is claimed, its pending instances (those no target confirmed yet) are handed to the
target plugin, and what the plugin confirms is written to the task file before anything else
happens. A job whose instances are all confirmed moves to ``success/``; one that failed waits
``retry_delay`` (doubling each time, with jitter) and is tried again, up to ``retry_max``
times, then moves to ``error/`` with the reason in its task file.
"""

from __future__ import annotations

import errno
import heapq
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mercure.config import Config
from mercure.controls import is_suspended
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.claims import Claim
from mercure.jobs.incoming import instance_files, instance_names
from mercure.jobs.store import JobRef
from mercure.jobs.task import DeliveryAttempt, Task, TaskDispatch
from mercure.ledger.digest import digests as instance_digests
from mercure.priorities import PRIORITIES, OffpeakWindow, Priority, PriorityPicker, rule_priority
from mercure.processing.results import completion_notice
from mercure.services.base import Service
from mercure.services.runtime import Runtime
from mercure.targets import DeliveryJob, DeliveryResult, MoreFiles, PermanentTargetError

MAX_ATTEMPTS_KEPT = 20
OPEN_JOB_RECHECK = 0.05
MORE_FILES_POLL = 0.02
PROGRESS_FLUSH_INTERVAL = 1.0


def _attempts_since(dispatch: TaskDispatch | None, since: float | None) -> dict[str, Any]:
    """``{"attempts": [...]}``: the tries at each target made in this pass, for the ledger."""
    if dispatch is None or since is None:
        return {}
    made = [a.model_dump(mode="json") for a in dispatch.attempts if a.at >= since]
    return {"attempts": made} if made else {}


def retry_delay(config: Config, retries: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number ``retries + 1``: exponential, capped, with jitter."""
    base = min(config.retry_delay * (2 ** max(retries - 1, 0)), config.retry_delay_max)
    return float(base) * (rng or random).uniform(0.8, 1.2)


class Dispatcher(Service):
    """Sends due jobs, several at once (``dispatcher_workers``)."""

    name = "dispatcher"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.config.dispatcher_scan_interval)
        self.runtime = runtime
        self.pool = ThreadPoolExecutor(
            max_workers=runtime.config.dispatcher_workers, thread_name_prefix="dispatch"
        )
        self.in_flight: dict[str, Future[None]] = {}
        # job id -> next_retry_at, and per priority a heap of (due, arrived, id) over it: a pass
        # reads no task files and costs the same per job whether 100 or 20,000 jobs wait.
        self.due_at: dict[str, float] = {}
        self.priority_of: dict[str, Priority] = {}
        self.arrived: dict[str, float] = {}
        self._heaps: dict[Priority, list[tuple[float, float, str]]] = {p: [] for p in PRIORITIES}
        self.picker = PriorityPicker()
        #: The clock of the off-peak check (tests set it; the rest of the dispatcher is real).
        self.clock = time.time
        self._halted = False
        self._next_scan = 0.0
        self._rescan = True
        self._lock = threading.Lock()

    @property
    def window(self) -> OffpeakWindow:
        """The off-peak window of the running configuration (it may be reloaded)."""
        return OffpeakWindow.from_config(self.runtime.config)

    def wake(self) -> None:
        """New jobs may be waiting: list ``outgoing/`` again on the next pass."""
        self._rescan = True
        super().wake()

    def _schedule(self, job_id: str, due: float, priority: Priority | None = None) -> None:
        with self._lock:
            if priority is not None:
                self.priority_of[job_id] = priority
            prio = self.priority_of.get(job_id, "normal")
            self.due_at[job_id] = due
            heapq.heappush(self._heaps[prio], (due, self.arrived.get(job_id, 0.0), job_id))

    def _forget(self, job_id: str) -> None:
        """The job left outgoing/: if it comes back (``mercure job retry``), scan it anew."""
        with self._lock:
            self.due_at.pop(job_id, None)
            self.priority_of.pop(job_id, None)
            self.arrived.pop(job_id, None)

    def halted(self) -> bool:
        """mercure's HALT file in ``outgoing/``: no new delivery starts while it is there."""
        halted = is_suspended(self.runtime.config, "dispatching")
        if halted != self._halted:
            self._halted = halted
            if halted:
                self.log.warning("dispatching suspended: HALT file present")
            else:
                self.log.info("dispatching resumed: HALT file removed")
        return halted

    def _head(self, priority: Priority, now: float) -> tuple[float, float, str] | None:
        """The oldest due job of one priority (stale heap entries are dropped on the way)."""
        heap = self._heaps[priority]
        while heap:
            due, _arrived, name = heap[0]
            if self.due_at.get(name) != due:
                heapq.heappop(heap)  # stale: rescheduled or gone
                continue
            if due > now:
                return None
            if name in self.in_flight:
                # Rescheduled by its own delivery, which is still finishing: put back in
                # run_once once that ends, so the retry is never lost.
                heapq.heappop(heap)
                continue
            return heap[0]
        return None

    def _next_due(self, now: float) -> str | None:
        """The next job to send: urgent on two picks of three, offpeak only in its window."""
        urgent = self._head("urgent", now)
        normal = self._head("normal", now)
        if self.window.contains(self.clock()):
            offpeak = self._head("offpeak", now)
            if offpeak is not None and (normal is None or offpeak[1] < normal[1]):
                normal = offpeak
        kind = self.picker.choose(urgent is not None, normal is not None)
        if kind is None:
            return None
        entry = urgent if kind == "urgent" else normal
        assert entry is not None
        for heap in self._heaps.values():  # the entry is the head of its priority's heap
            if heap and heap[0] is entry:
                heapq.heappop(heap)
                break
        return entry[2]

    def _scan(self, now: float) -> None:
        outgoing = self.runtime.store.folders["outgoing"]
        with os.scandir(outgoing) as entries:
            # Job folders only: mercure's HALT file lives here too.
            names = {
                e.name
                for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            }
        with self._lock:
            for gone in set(self.due_at) - names:
                del self.due_at[gone]
        for name in names - set(self.due_at):
            found = self._read_due(outgoing / name)
            if found is not None:
                self._schedule(name, *found)
        with self._lock:
            if sum(map(len, self._heaps.values())) > 2 * len(self.due_at) + 64:
                self._rebuild_heaps()  # drop stale heap entries
        self._next_scan = now + self.interval

    def _rebuild_heaps(self) -> None:
        self._heaps = {p: [] for p in PRIORITIES}
        for name, due in self.due_at.items():
            prio = self.priority_of.get(name, "normal")
            self._heaps[prio].append((due, self.arrived.get(name, 0.0), name))
        for heap in self._heaps.values():
            heapq.heapify(heap)

    def run_once(self) -> int:
        now = time.time()
        if self._rescan or now >= self._next_scan:
            self._rescan = False
            self._scan(now)
        if self.halted():
            return 0
        outgoing = self.runtime.store.folders["outgoing"]
        with self._lock:
            for job_id in [i for i, f in self.in_flight.items() if f.done()]:
                del self.in_flight[job_id]
                if job_id in self.due_at:  # still in outgoing/: due again (see _head)
                    prio = self.priority_of.get(job_id, "normal")
                    entry = (self.due_at[job_id], self.arrived.get(job_id, 0.0), job_id)
                    heapq.heappush(self._heaps[prio], entry)
            free = self.runtime.config.dispatcher_workers * 2 - len(self.in_flight)
        submitted = 0
        while free > 0 and not self.stop_event.is_set():
            with self._lock:
                name = self._next_due(now)
                if name is None:
                    break
                ref = JobRef(name, "outgoing", outgoing / name)
                self.in_flight[name] = self.pool.submit(self._deliver_logged, ref)
            free -= 1
            submitted += 1
        return submitted

    def _read_due(self, folder: Path) -> tuple[float, Priority] | None:
        """When the job is due and its priority (from its rules in the running configuration)."""
        try:
            arrived = folder.stat().st_mtime
            task = Task.model_validate_json((folder / "task.json").read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return 0.0, "urgent"  # unreadable task file: deliver() moves it to error/ with why
        self.arrived[folder.name] = arrived
        prio = rule_priority(self.runtime.config, task.info.applied_rule, task.info.triggered_rules)
        dispatch = task.dispatch_state
        return (float(dispatch.next_retry_at or 0.0) if dispatch else 0.0), prio

    def _deliver_logged(self, ref: JobRef) -> None:
        try:
            self.deliver(ref)
        except Exception:
            self.log.exception("delivering job failed unexpectedly", task_id=ref.id)
            self._schedule(ref.id, time.time() + self.runtime.config.retry_delay)
        finally:
            self.wake_event.set()  # a worker is free: let the loop hand out the next job

    def deliver(self, ref: JobRef) -> None:
        """Claim one job and try to deliver what is still pending."""
        store = self.runtime.store
        started = time.time()  # attempts made from now on belong to this pass (the ledger's)
        claim = store.claim(ref)
        if claim is None:
            # Another dispatcher has it; look again later in case that one dies.
            if ref.path.exists():
                self._schedule(ref.id, time.time() + self.interval)
            return
        with claim:
            log = self.log.bind(task_id=ref.id)
            try:
                task = store.read(ref)
            except FileNotFoundError:
                return
            except ValueError as exc:
                self._to_error(ref, None, claim, f"task.json cannot be read: {exc}")
                return
            dispatch = task.dispatch_state
            if dispatch is None:
                self._to_error(ref, task, claim, "task.json has no dispatch section")
                return
            if float(dispatch.next_retry_at or 0.0) > time.time():
                self._schedule(ref.id, float(dispatch.next_retry_at or 0.0))
                return  # a manual change or another dispatcher rescheduled it
            log = log.bind(series_uid=dispatch.series_uid)
            warned = False  # about a full disk, for this job
            while True:
                was_open = store.is_open(ref)  # checked before listing: no file is missed
                if was_open and not self._all_stream(task):
                    self._schedule(ref.id, time.time() + OPEN_JOB_RECHECK)
                    return  # this target wants the whole series; wait until it is complete
                files = instance_files(ref.path)
                errors: list[str] = []
                permanent: list[str] = []
                for target_name in task.target_names:
                    error = self._deliver_to(
                        ref, task, dispatch, target_name, files, was_open, permanent
                    )
                    if error:
                        errors.append(f"{target_name}: {error}")
                if permanent:
                    reason = "; ".join(errors)
                    self._to_error(
                        ref, task, claim, f"not retried, cannot succeed: {reason}", since=started
                    )
                    return
                if errors:
                    self._failed(ref, task, dispatch, claim, errors, len(files), since=started)
                    return
                if not was_open:
                    break
                if store.is_open(ref):
                    # Series still arriving: come back to it soon. On a full disk the delivery
                    # record cannot be written: keep it in memory and stay with the job, rather
                    # than send the same instances again on the next pass.
                    if self._write_unless_full(ref, task, log, warned):
                        self._schedule(ref.id, time.time() + OPEN_JOB_RECHECK)
                        return
                    warned = True
                    if self.stop_event.wait(OPEN_JOB_RECHECK):
                        return
            errors, permanent = self._finish_targets(ref, task, dispatch, files)
            if permanent:
                reason = "; ".join(errors)
                self._to_error(ref, task, claim, f"not retried, cannot succeed: {reason}")
                return
            if errors:
                self._failed(ref, task, dispatch, claim, errors, len(files))
                return
            # On a full disk the job still moves (a rename needs no space) with its previous
            # task file: the target has every instance, and sending them again and again until
            # space returns would keep the disk full, since only delivered jobs are cleaned.
            self._write_unless_full(ref, task, log, warned)
            store.move(ref, "success", claim)
            self._forget(ref.id)
            log.info("job delivered", targets=task.target_names, instances=len(files))
            self.runtime.emit(
                TaskEvent(
                    TaskEventType.COMPLETED,
                    ref.id,
                    dispatch.series_uid or "",
                    ", ".join(task.target_names),
                    len(files),
                    tags=task.tags,
                    extra={
                        **({"duration": time.time() - task.created_at} if task.created_at else {}),
                        **_attempts_since(dispatch, started),
                    },
                )
            )
            for rule in self._rules(task):
                # The results of processing: the modules' notification text, on request.
                details, always = completion_notice(self.runtime.config, task, rule)
                self.runtime.notify_rule(
                    "completion", rule, ref.id, task.tags, details, always=always
                )

    def _finish_targets(
        self, ref: JobRef, task: Task, dispatch: TaskDispatch, files: list[Path]
    ) -> tuple[list[str], list[str]]:
        """Call ``Target.finish`` of each target not finished yet; (errors, permanent ones)."""
        errors: list[str] = []
        permanent: list[str] = []
        for name in task.target_names:
            if name in dispatch.finished:
                continue
            job = DeliveryJob(task_id=ref.id, folder=ref.path, files=files, tags=task.tags,
                              task=task)  # fmt: skip
            try:
                self.runtime.target(name).finish(job)
            except Exception as exc:
                text = str(exc).strip() or exc.__class__.__name__
                errors.append(f"{name}: completing the series failed: {text}")
                if isinstance(exc, PermanentTargetError):
                    permanent.append(name)
                continue
            dispatch.finished.append(name)
        return errors, permanent

    def _write_unless_full(self, ref: JobRef, task: Task, log: Any, warned: bool) -> bool:
        """Write the task file; False (logged once) if the disk is full, other errors raise."""
        try:
            self.runtime.store.write(ref, task)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if not warned:
                log.warning(
                    "disk full: the delivery record in task.json cannot be updated",
                    folder=str(ref.path),
                    error=str(exc),
                )
            return False
        return True

    def _all_stream(self, task: Task) -> bool:
        try:
            return all(self.runtime.target(n).streaming for n in task.target_names)
        except Exception:
            return True  # let _deliver_to report the unknown target

    def _failed(
        self,
        ref: JobRef,
        task: Task,
        dispatch: TaskDispatch,
        claim: Claim,
        errors: list[str],
        file_count: int,
        since: float | None = None,
    ) -> None:
        """Schedule the next try with backoff, or move the job to error/ after retry_max."""
        reason = "; ".join(errors)
        dispatch.retries = (dispatch.retries or 0) + 1
        if dispatch.retries > self.runtime.config.retry_max:
            self._to_error(
                ref, task, claim, f"gave up after {dispatch.retries} tries: {reason}", since=since
            )
            return
        delay = retry_delay(self.runtime.config, dispatch.retries)
        dispatch.next_retry_at = time.time() + delay
        self.runtime.store.write(ref, task)
        self._schedule(ref.id, dispatch.next_retry_at)
        self.log.warning(
            "delivery failed; will retry",
            task_id=ref.id,
            retry=dispatch.retries,
            retry_max=self.runtime.config.retry_max,
            in_seconds=round(delay, 1),
            reason=reason,
        )
        self.runtime.emit(
            TaskEvent(
                TaskEventType.RETRY_SCHEDULED,
                ref.id,
                dispatch.series_uid or "",
                ", ".join(task.target_names),
                file_count,
                info=reason,
                tags=task.tags,
                extra={
                    "retry": dispatch.retries,
                    "next_retry_at": dispatch.next_retry_at,
                    **_attempts_since(dispatch, since),
                },
            )
        )

    def _deliver_to(
        self,
        ref: JobRef,
        task: Task,
        dispatch: TaskDispatch,
        target_name: str,
        files: list[Path],
        job_open: bool = False,
        permanent: list[str] | None = None,
    ) -> str | None:
        """Send the files ``target_name`` has not confirmed; record the result in ``task``.

        A permanent failure (:class:`PermanentTargetError`, ``DeliveryResult.permanent``) adds
        the target's name to ``permanent``.
        """
        delivered = set(dispatch.delivered.get(target_name, []))
        pending = [f for f in files if f.name not in delivered]
        if not pending and not job_open:
            return None
        if target_name not in self.runtime.config.targets:
            return f"target '{target_name}' is not in the configuration any more"
        handed = {f.name for f in pending}
        more: MoreFiles | None = None
        if job_open:
            more = self._more_files(ref, delivered | handed, handed)
            if not pending:
                pending = more(0.0) or []
                if not pending:
                    return None
        early: set[str] = set()  # confirmed during the send, through DeliveryJob.confirm
        last_flush = [0.0]

        def confirm(names: list[str]) -> None:
            early.update(n for n in names if n in handed)
            if time.monotonic() - last_flush[0] < PROGRESS_FLUSH_INTERVAL:
                return
            last_flush[0] = time.monotonic()
            dispatch.delivered[target_name] = sorted(delivered | early)
            self._write_unless_full(ref, task, self.log.bind(task_id=ref.id), warned=True)

        try:
            target = self.runtime.target(target_name)
            result = target.send(
                DeliveryJob(
                    task_id=ref.id,
                    folder=ref.path,
                    files=pending,
                    tags=task.tags,
                    task=task,
                    more=more,
                    confirm=confirm,
                )
            )
        except Exception as exc:
            text = str(exc).strip() or exc.__class__.__name__
            result = DeliveryResult(error=text, permanent=isinstance(exc, PermanentTargetError))
        confirmed = sorted(early.union(n for n in result.delivered if n in handed))
        delivered.update(confirmed)
        dispatch.delivered[target_name] = sorted(delivered)
        failed = {n: r for n, r in result.failed.items() if n in handed}
        still_missing = handed - delivered
        general = result.error or "target did not confirm these instances"
        for name in still_missing:
            failed.setdefault(name, general)
        if failed:
            dispatch.failed[target_name] = failed
        else:
            dispatch.failed.pop(target_name, None)
        dispatch.attempts.append(
            DeliveryAttempt(
                at=time.time(),
                target=target_name,
                delivered=len(confirmed),
                failed=len(still_missing),
                error=result.error,
            )
        )
        del dispatch.attempts[:-MAX_ATTEMPTS_KEPT]
        if confirmed:
            extra: dict[str, Any] = {}
            if self.runtime.ledger_digests:
                # The ledger's per-instance record: UID and digest of each confirmed file.
                paths = [ref.path / name for name in confirmed]
                extra["instances"] = [d.to_json() for d in instance_digests(paths)]
            self.runtime.emit(
                TaskEvent(
                    TaskEventType.DELIVERED,
                    ref.id,
                    dispatch.series_uid or "",
                    target_name,
                    len(confirmed),
                    tags=task.tags,
                    extra=extra,
                )
            )
        if not still_missing:
            return None
        if result.permanent and permanent is not None:
            permanent.append(target_name)
        count = f"{len(still_missing)} of {len(handed)} instance(s) not delivered"
        if result.error:
            return f"{count}: {result.error}"
        first = sorted(failed.items())[:3]
        return f"{count} ({', '.join(f'{n}: {r}' for n, r in first)})"

    def _more_files(self, ref: JobRef, seen: set[str], handed: set[str]) -> MoreFiles:
        """The ``DeliveryJob.more`` callback of an open job: new files as the router links them."""
        store = self.runtime.store

        def more(timeout: float) -> list[Path] | None:
            deadline = time.monotonic() + timeout
            while True:
                closed = not store.is_open(ref)  # before listing, so no late file is missed
                names = instance_names(ref.path) - seen
                if names:
                    seen.update(names)
                    handed.update(names)
                    return [ref.path / name for name in sorted(names)]
                if closed:
                    return None
                if time.monotonic() >= deadline or self.stop_event.is_set():
                    return []
                time.sleep(MORE_FILES_POLL)

        return more

    def _to_error(
        self,
        ref: JobRef,
        task: Task | None,
        claim: object,
        reason: str,
        since: float | None = None,
    ) -> None:
        from mercure.jobs.claims import Claim

        if task is not None:
            task.error = reason
            task.history.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} error: {reason}")
            self.runtime.store.write(ref, task)
        self.runtime.store.move(ref, "error", claim if isinstance(claim, Claim) else None)
        self._forget(ref.id)
        self.log.error("job moved to error", task_id=ref.id, reason=reason)
        tags = task.tags if task else {}
        self.runtime.emit(
            TaskEvent(
                TaskEventType.MOVED_TO_ERROR,
                ref.id,
                tags.get("SeriesInstanceUID", ""),
                ", ".join(task.target_names) if task else "",
                info=reason,
                tags=tags,
                extra=_attempts_since(task.dispatch_state if task else None, since),
            )
        )
        if task is not None:
            for rule in self._rules(task):
                self.runtime.notify_rule("error", rule, ref.id, task.tags, reason)

    @staticmethod
    def _rules(task: Task) -> list[str]:
        rules = task.info.triggered_rules
        return list(rules) if isinstance(rules, dict) else []

    def close(self) -> None:
        self.pool.shutdown(wait=True)
