"""Rule replay: what a changed configuration would route differently, on the recorded series.

Each routing the ledger recorded (the jobs one series' reception made, with the tags the rules
saw) is evaluated again with the new configuration's rules, through the router's own
:func:`~mercure.services.router.evaluate_rules` and :func:`~mercure.services.router.plan_jobs`
(pure functions: nothing is written anywhere), and the two outcomes are compared: targets
gained or lost, discarded or no longer, the fallback rule, processing modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mercure.config import Config
from mercure.ledger.query import LedgerQueries


@dataclass
class Outcome:
    """Where one series goes: targets, processing modules, discarded or not, by which rules."""

    targets: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    discarded: bool = False
    notification: bool = False
    rules: list[str] = field(default_factory=list)
    fallback: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": self.targets,
            "modules": self.modules,
            "discarded": self.discarded,
            "notification": self.notification,
            "rules": self.rules,
            "fallback": self.fallback,
        }


@dataclass
class ReplayChange:
    """One recorded series that the new rules would route differently."""

    series_uid: str
    received: float
    tags: dict[str, str]
    jobs: list[str]
    old: Outcome
    new: Outcome
    changes: list[str]

    def to_json(self) -> dict[str, Any]:
        t = self.tags
        return {
            "series_uid": self.series_uid,
            "received": self.received,
            "patient_id": t.get("PatientID", ""),
            "accession": t.get("AccessionNumber", ""),
            "modality": t.get("Modality", ""),
            "series_description": t.get("SeriesDescription", ""),
            "jobs": self.jobs,
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "changes": self.changes,
        }


@dataclass
class ReplayReport:
    routings: int
    changed: list[ReplayChange]

    def to_json(self) -> dict[str, Any]:
        return {
            "routings": self.routings,
            "changed": [c.to_json() for c in self.changed],
        }


def outcome_of(tasks: list[dict[str, Any]]) -> Outcome:
    """The outcome the task files of one routing describe."""
    out = Outcome()
    for task in tasks:
        info = task.get("info") if isinstance(task.get("info"), dict) else {}
        assert isinstance(info, dict)
        action = info.get("action", "")
        rules = info.get("triggered_rules")
        if isinstance(rules, dict):
            out.rules.extend(r for r in rules if r not in out.rules)
        dispatch = task.get("dispatch") if isinstance(task.get("dispatch"), dict) else {}
        assert isinstance(dispatch, dict)
        names = dispatch.get("target_name") or []
        for name in [names] if isinstance(names, str) else list(names):
            if name and name not in out.targets:
                out.targets.append(name)
        process = task.get("process")
        steps = process if isinstance(process, list) else [process] if process else []
        for step in steps:
            if isinstance(step, dict) and step.get("module_name"):
                out.modules.append(str(step["module_name"]))
        if action == "discard":
            out.discarded = True
        if action == "notification":
            out.notification = True
    out.targets.sort()
    return out


def _recorded_tasks(job: dict[str, Any]) -> dict[str, Any]:
    """A job's task file from the ledger, or one rebuilt from its columns."""
    try:
        task = json.loads(job.get("task") or "{}")
    except ValueError:
        task = {}
    if isinstance(task, dict) and task.get("info"):
        return task
    targets = [t.strip() for t in str(job.get("targets") or "").split(",") if t.strip()]
    rules = [r.strip() for r in str(job.get("rules") or "").split(",") if r.strip()]
    return {
        "info": {"action": job.get("action") or "", "triggered_rules": dict.fromkeys(rules, True)},
        "dispatch": {"target_name": targets} if targets else {},
    }


def compare(old: Outcome, new: Outcome, config: Config) -> list[str]:
    """What differs, in words an operator reads before a change goes live."""
    changes: list[str] = []
    gained = [t for t in new.targets if t not in old.targets]
    lost = [t for t in old.targets if t not in new.targets]
    if gained:
        changes.append(f"new targets: {', '.join(gained)}")
    if lost:
        changes.append(f"lost targets: {', '.join(lost)}")
    if new.discarded and not old.discarded:
        by = [r for r in new.rules if r in config.rules and config.rules[r].action == "discard"]
        changes.append(f"discarded by rule {by[0]}" if by else "discarded: no rule matches")
    if old.discarded and not new.discarded:
        changes.append("no longer discarded")
    if new.fallback and (changes or sorted(old.rules) != sorted(new.rules)):
        changes.append(f"fallback rule: {', '.join(new.rules)}")
    if old.modules != new.modules:
        changes.append(
            f"processing: {' -> '.join(old.modules) or 'none'} becomes "
            f"{' -> '.join(new.modules) or 'none'}"
        )
    if new.notification != old.notification:
        changes.append("notification only" if new.notification else "no longer notification only")
    return changes


def replay(queries: LedgerQueries, config: Config, since: float) -> ReplayReport:
    """Evaluate ``config``'s rules on every routing recorded since ``since``."""
    from mercure.services.router import evaluate_rules, plan_jobs

    rows = queries.db.query(
        "SELECT task_id, series_uid, created, action, rules, targets, task, tags FROM jobs "
        "WHERE parent_id = '' AND created >= ? ORDER BY created, task_id",
        [since],
    )
    routings: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        routings.setdefault((str(row["series_uid"]), float(row["created"])), []).append(row)
    changed: list[ReplayChange] = []
    for (series_uid, created), jobs in routings.items():
        try:
            tags = json.loads(jobs[0].get("tags") or "{}")
        except ValueError:
            tags = {}
        if not isinstance(tags, dict) or not tags:
            continue  # nothing to evaluate rules on
        tags = {str(k): str(v) for k, v in tags.items()}
        old = outcome_of([_recorded_tasks(j) for j in jobs])
        decision = evaluate_rules(config, tags)
        planned = plan_jobs(config, tags, decision)
        new = outcome_of([p.task for p in planned])
        new.fallback = decision.fallback_used
        if decision.discard_rule:
            new.rules = [decision.discard_rule]
        changes = compare(old, new, config)
        if changes:
            changed.append(
                ReplayChange(
                    series_uid, created, tags, [str(j["task_id"]) for j in jobs], old, new, changes
                )
            )
    return ReplayReport(len(routings), changed)


__all__ = ["Outcome", "ReplayChange", "ReplayReport", "compare", "outcome_of", "replay"]
