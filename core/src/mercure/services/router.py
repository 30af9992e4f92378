"""The router: turns complete series into jobs according to the rules.

For each series that has been quiet for ``series_complete_trigger`` seconds:

1. take it out of the incoming spool (an atomic rename) and claim it;
2. evaluate the rules on its tags and write the resulting plan (``plan.json``) durably;
3. create every planned job (idempotent per task id) in ``outgoing/``, ``processing/`` or
   ``discard/``;
4. remove the series folder.

A router killed at any point leaves the series in ``incoming/.routing`` with or without a
plan; the next router pass claims it and finishes the same plan, so no job is made twice.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercure import __version__
from mercure.config import Config, Rule
from mercure.events import TaskEvent, TaskEventType
from mercure.fsutil import remove_tree
from mercure.jobs.claims import try_claim
from mercure.jobs.incoming import (
    instance_files,
    instance_names,
    read_plan,
    read_series_tags,
    write_plan_once,
)
from mercure.jobs.store import State
from mercure.jobs.studies import StudyBusy, StudyStore
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, TaskProcessing
from mercure.metrics import Metric
from mercure.mpps import MPPS_FOLDER, MppsIndex
from mercure.rules import RuleResult, compile_rule
from mercure.services.base import Service
from mercure.services.runtime import Runtime
from mercure.services.studies import RELEASE_STATE, StudyReleaser, collect_series, study_task
from mercure.tags import read_tags

EARLY_DISPATCH_INTERVAL = 0.1
DONE_PREFIX = ".done-"


@dataclass
class Decision:
    """What the rules decided for one series."""

    triggered: list[str]
    results: dict[str, RuleResult]
    fallback_used: bool = False
    discard_rule: str | None = None
    notes: list[str] = field(default_factory=list)


def evaluate_rules(config: Config, tags: dict[str, str]) -> Decision:
    """Apply mercure's rule semantics: enabled rules, else fallback rules; discard wins."""
    results: dict[str, RuleResult] = {}
    triggered: list[str] = []
    for name, rule in config.rules.items():
        if rule.disabled or rule.fallback:
            continue
        result = compile_rule(rule.rule).evaluate(tags)
        results[name] = result
        if result.matched:
            triggered.append(name)
    fallback_used = False
    if not triggered:
        for name, rule in config.rules.items():
            if rule.fallback and not rule.disabled:
                triggered.append(name)
                fallback_used = True
    discard_rule = next((n for n in triggered if config.rules[n].action == "discard"), None)
    return Decision(triggered, results, fallback_used, discard_rule)


def module_settings(
    config: Config, module: str, rule_settings: list[dict[str, Any]] | dict[str, Any], index: int
) -> dict[str, Any]:
    """mercure's step settings: the module's ``settings``, updated by the rule's
    ``processing_settings`` (a list: one object per step of a chain)."""
    merged: dict[str, Any] = {}
    definition = config.modules.get(module)
    if definition is not None:
        merged.update(definition.settings)
    if isinstance(rule_settings, list):
        if index < len(rule_settings):
            merged.update(rule_settings[index])
    else:
        merged.update(rule_settings)
    return merged


@dataclass
class PlannedJob:
    id: str
    state: State
    task: dict[str, Any]
    event: str
    rules: list[str]
    #: Notification-only rules that matched next to this job's rules: told on reception too.
    notify: list[str] = field(default_factory=list)
    #: Set for a series that a study-level rule collects: the series goes into that rule's
    #: study (``task`` is the study job's task file should this series start the study;
    #: ``state`` where the study goes once complete).
    study: str | None = None


def rule_processes(config: Config, rule: Rule) -> Any:
    """The ``process`` section of a rule's jobs: one step, or a list for a chain."""
    processes = [
        TaskProcessing(
            module_name=module,
            module_config=config.modules.get(module),
            settings=module_settings(config, module, rule.processing_settings, i),
            retain_input_images=rule.processing_retain_images,
        )
        for i, module in enumerate(rule.modules)
    ]
    if not processes:
        return {}
    return processes[0] if len(processes) == 1 else processes


def _study_entry(
    config: Config,
    tags: dict[str, str],
    name: str,
    rule: Rule,
    now: float,
    task: Callable[..., dict[str, Any]],
) -> PlannedJob:
    """The plan entry of a study-level rule: collect the series into the rule's study."""
    if not tags.get("StudyInstanceUID"):
        reason = (
            f"rule '{name}' collects studies, but the series has no StudyInstanceUID; "
            "the series was not routed"
        )
        t = task(rule.action, [name])
        t["error"] = reason
        t["info"]["fail_stage"] = "ROUTING"
        return PlannedJob(t["id"], "error", t, TaskEventType.MOVED_TO_ERROR, [name])
    processes = rule_processes(config, rule) if rule.action in ("process", "both") else {}
    study = study_task(config, name, tags, processes, now).model_dump(mode="json")
    state = RELEASE_STATE.get(rule.action, "outgoing")
    key = str(uuid.uuid4())
    return PlannedJob(key, state, study, TaskEventType.STUDY_COLLECTED, [name], study=name)


def plan_jobs(config: Config, tags: dict[str, str], decision: Decision) -> list[PlannedJob]:
    """Turn a decision into jobs: one per distinct target, one per processing rule."""
    series_uid = tags.get("SeriesInstanceUID", "")
    now = time.time()

    def task(action: str, rules: list[str], **sections: Any) -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        info = TaskInfo(
            action=action,
            uid=series_uid,
            uid_type="series",
            triggered_rules=dict.fromkeys(rules, True) if rules else "",
            applied_rule=rules[0] if rules else None,
            patient_name=tags.get("PatientName", "MISSING"),
            mrn=tags.get("PatientID", "MISSING"),
            acc=tags.get("AccessionNumber", "MISSING"),
            sender_address=tags.get("SenderAddress", "MISSING"),
            mercure_version=__version__,
            mercure_appliance=config.appliance_name,
            mercure_server=socket.gethostname(),
            device_serial_number=tags.get("DeviceSerialNumber"),
        )
        return Task(info=info, id=task_id, created_at=now, tags=tags, **sections).model_dump(
            mode="json"
        )

    if decision.discard_rule is not None or not decision.triggered:
        rules = [decision.discard_rule] if decision.discard_rule else []
        t = task("discard", rules)
        return [PlannedJob(t["id"], "discard", t, TaskEventType.DISCARDED, rules)]

    jobs: list[PlannedJob] = []
    route_targets: dict[str, list[str]] = {}
    notification_only: list[str] = []
    for name in decision.triggered:
        rule: Rule = config.rules[name]
        if rule.action_trigger == "study":
            jobs.append(_study_entry(config, tags, name, rule, now, task))
        elif rule.action == "route":
            for target in rule.targets:
                route_targets.setdefault(target, []).append(name)
        elif rule.action in ("process", "both"):
            processes = rule_processes(config, rule)
            dispatch: Any = {}
            if rule.action == "both" and rule.targets:
                dispatch = TaskDispatch(
                    target_name=rule.targets[0] if len(rule.targets) == 1 else rule.targets,
                    series_uid=series_uid,
                )
            t = task(rule.action, [name], process=processes, dispatch=dispatch)
            jobs.append(
                PlannedJob(t["id"], "processing", t, TaskEventType.QUEUED_FOR_PROCESSING, [name])
            )
        elif rule.action == "notification":
            notification_only.append(name)
    for target, rules in route_targets.items():
        dispatch = TaskDispatch(target_name=target, series_uid=series_uid)
        t = task("route", rules, dispatch=dispatch)
        jobs.append(PlannedJob(t["id"], "outgoing", t, TaskEventType.ROUTED, rules))
    if not jobs:
        # Only notification rules matched: tell people, keep the images for the retention time.
        kind = "notification" if notification_only else "discard"
        event = TaskEventType.NOTIFICATION if notification_only else TaskEventType.DISCARDED
        t = task(kind, notification_only)
        jobs.append(PlannedJob(t["id"], "discard", t, event, notification_only))
    elif notification_only:
        # mercure sends a notification rule's reception notice whatever else matched.
        jobs[0].notify = notification_only
    return jobs


class Router(Service):
    """Finds complete series and routes them; streams arriving ones to targets that can."""

    name = "router"

    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config
        interval = config.router_scan_interval
        if config.early_dispatch:
            interval = min(interval, EARLY_DISPATCH_INTERVAL)
        super().__init__(interval)
        self.runtime = runtime
        #: Called after a pass that created jobs (the supervisor wakes the dispatcher with it).
        self.on_jobs_created: list[Callable[[], None]] = []
        # series folder name -> names already linked into its open jobs (this process only)
        self._linked: dict[str, set[str]] = {}
        # series folder name -> its plan, so a streaming pass does not read .plan.json again
        self._plans: dict[str, list[PlannedJob]] = {}
        # series folders whose routing failed with an OSError (warned once each)
        self._stalled: set[str] = set()
        self.studies = StudyStore(
            runtime.config.folder("studies"), runtime.store, fsync=runtime.fsync
        )
        #: What modalities reported by MPPS: series and studies complete without waiting.
        self.mpps = MppsIndex(runtime.spool.folder / MPPS_FOLDER)
        self.releaser = StudyReleaser(runtime, self.studies, self.mpps)

    def run_once(self) -> int:
        handled = 0
        spool = self.runtime.spool
        self._remove_finished()
        # Series a router took but did not finish (it died): finish them first.
        for taken in spool.taken():
            if self.stop_event.is_set():
                return handled
            handled += self._one_series(taken, self._route_taken, taken)
        now = time.time()
        quiet = self.runtime.config.series_complete_trigger
        arriving = spool.series()
        self.mpps.refresh(now)
        for series in arriving:
            if self.stop_event.is_set():
                return handled
            if now - series.last_change >= quiet or self._reported_complete(series.path):
                self._linked.pop(series.path.name, None)
                self._plans.pop(series.path.name, None)
                taken_path = spool.take(series.path)
                if taken_path is not None:
                    handled += self._one_series(taken_path, self._route_taken, taken_path)
            elif self.runtime.config.early_dispatch:
                handled += self._one_series(series.path, self._stream, series.path)
        if len(self._linked) > len(arriving):
            names = {s.path.name for s in arriving}
            self._linked = {k: v for k, v in self._linked.items() if k in names}
            self._plans = {k: v for k, v in self._plans.items() if k in names}
        if not self.stop_event.is_set():
            handled += self._release_studies()
        if handled:
            for callback in self.on_jobs_created:
                callback()
        return handled

    def _reported_complete(self, folder: Path) -> bool:
        """Every instance a COMPLETED MPPS step lists for this series is in (no waiting)."""
        if not self.mpps.series_instances:
            return False
        try:
            present = instance_names(folder)
        except FileNotFoundError:
            return False
        if not self.mpps.series_complete(folder.name, present):
            return False
        self.log.info("series complete: MPPS listed instances all in", folder=folder.name,
                      instances=len(present))  # fmt: skip
        return True

    def _release_studies(self) -> int:
        """Release the complete studies (mercure's ``route_studies``, after the series)."""
        try:
            return self.releaser.run_once()
        except OSError as exc:
            self.log.warning("cannot release studies now; tried again on the next pass",
                             error=str(exc))  # fmt: skip
            return 0

    def _one_series(self, folder: Path, step: Callable[[Path], int], arg: Path) -> int:
        """Run one series' step; an ``OSError`` (a full disk) leaves that series for the next pass.

        One series that cannot be routed now must not hold up the others: completing a series
        whose jobs exist needs no space, and only delivered jobs free it.
        """
        try:
            handled = step(arg)
        except StudyBusy as exc:
            self.log.info("study busy; the series is added on the next pass", error=str(exc))
            return 0
        except OSError as exc:
            if folder.name not in self._stalled:
                self._stalled.add(folder.name)
                self.log.warning(
                    "cannot route this series now; it is tried again on the next pass",
                    folder=folder.name,
                    error=str(exc),
                )
            return 0
        self._stalled.discard(folder.name)
        return handled

    # -- series still arriving ---------------------------------------------------------------

    def _plan(self, folder: Path, files: list[Path]) -> list[PlannedJob] | None:
        """The series' plan: stored with it, or made now from its tags (once, by one router)."""
        stored = read_plan(folder)
        if stored is None and not files:
            return None  # only series.tags: its instance went to a new series folder
        if stored is None:
            tags = read_series_tags(folder)
            if tags is None:
                if not files:
                    return None
                tags = self._tags_from_file(files[0])
            decision = evaluate_rules(self.runtime.config, tags)
            plan = plan_jobs(self.runtime.config, tags, decision)
            stored = write_plan_once(folder, [j.__dict__ for j in plan], fsync=self.runtime.fsync)
            if stored is None:
                return None
            self.log.info(
                "series routed",
                series_uid=tags.get("SeriesInstanceUID"),
                rules=decision.triggered or "none",
                fallback=decision.fallback_used,
                jobs=[f"{j['state']}/{j['id']}" for j in stored],
            )
        return [PlannedJob(**j) for j in stored]

    def _streams(self, job: PlannedJob) -> bool:
        if job.state != "outgoing" or job.study is not None:
            return False
        targets = job.task.get("dispatch", {}).get("target_name") or []
        names = [targets] if isinstance(targets, str) else list(targets)
        try:
            return bool(names) and all(self.runtime.target(n).streaming for n in names)
        except Exception:
            return False  # unknown target: the dispatcher reports it once the series is complete

    def _stream(self, folder: Path) -> int:
        """Open the streaming jobs of an arriving series and link its new instances into them."""
        linked = self._linked.setdefault(folder.name, set())
        new = [folder / name for name in sorted(instance_names(folder) - linked)]
        if not new:
            return 0
        plan = self._plans.get(folder.name) or self._plan(folder, new)
        if plan is None:
            return 0
        self._plans[folder.name] = plan
        store = self.runtime.store
        added = 0
        for job in plan:
            if not self._streams(job):
                continue
            ref = store.find_exact(job.id)
            try:
                if ref is None:
                    task = Task.model_validate(job.task)
                    store.create(job.state, task, new, open_job=True)
                    added += len(new)
                elif store.is_open(ref):
                    added += store.add_files(ref, new)
            except FileNotFoundError:
                return 0  # the series was taken meanwhile; routing it finishes the job
        linked.update(f.name for f in new)
        return 1 if added else 0

    # -- complete series ---------------------------------------------------------------------

    def _route_taken(self, folder: Path) -> int:
        claim = try_claim(folder)
        if claim is None:
            return 0
        with claim:
            self.route_series(folder)
            # Hide the folder in one atomic step before deleting it, so that a crash during the
            # deletion can never leave a half-deleted series that would be routed again.
            done = folder.with_name(DONE_PREFIX + folder.name)
            os.rename(folder, done)
            remove_tree(done)
        return 1

    def _remove_finished(self) -> None:
        for entry in os.scandir(self.runtime.spool.routing):
            if entry.name.startswith(DONE_PREFIX):
                remove_tree(Path(entry.path))

    def route_series(self, folder: Path) -> None:
        """Create (or complete) every planned job of one claimed, complete series folder."""
        files = instance_files(folder)
        plan = self._plan(folder, files)
        if plan is None:
            self.log.info("empty series folder removed", folder=folder.name)
            return
        store = self.runtime.store
        self.runtime.metrics(
            Metric("incoming.series", 1, service="router"),
            Metric("incoming.files", len(files), service="router"),
        )
        notified: set[str] = set()
        for job in plan:
            if job.study is not None:
                collect_series(self.runtime, self.studies, folder, job.id, job.task, files)
                for rule in job.notify:
                    if rule not in notified:
                        notified.add(rule)
                        self.runtime.notify_rule("reception", rule, job.id, job.task["tags"])
                continue
            task = Task.model_validate(job.task)
            ref = store.create(job.state, task, files)
            if store.is_open(ref):
                store.add_files(ref, files)
                store.close(ref)
            self.runtime.emit(
                TaskEvent(
                    type=TaskEventType(job.event),
                    task_id=job.id,
                    series_uid=task.info.uid,
                    target=", ".join(task.target_names),
                    file_count=len(files),
                    rule=", ".join(job.rules),
                    tags=task.tags,
                    extra={"task": job.task},  # the task file as created, for the ledger
                )
            )
            for rule in [*job.rules, *job.notify]:
                if rule not in notified:  # once per rule, even if it made several jobs
                    notified.add(rule)
                    self.runtime.notify_rule("reception", rule, job.id, task.tags)
        self.log.info(
            "series complete",
            series_uid=plan[0].task["info"]["uid"],
            instances=len(files),
            jobs=len(plan),
        )

    def _tags_from_file(self, path: Path) -> dict[str, str]:
        extra = list(self.runtime.config.dicom_receiver.additional_tags)
        return read_tags(str(path), extra)
