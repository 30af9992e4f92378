"""Nomad's own account of a run: how an allocation ended, why a job was not placed.

A run's outcome is read from Nomad, never guessed from its output folder: the exit code
from the task's ``Terminated`` event, a driver failure (image missing) from the event that
failed the task, a lost allocation from its client status, a cancel from the job's ``Stop``
flag and the ``Killing`` event, a placement failure from the evaluation's
``FailedTGAllocs`` (the constraints that filtered nodes, the exhausted resources).
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from typing import Any

from mercure_runner_nomad.jobspec import GROUP, TASK

TERMINAL = frozenset({"complete", "failed", "lost"})
#: Event fields that carry a reason, in the order they are worth showing.
REASON_FIELDS = (
    "DisplayMessage",
    "DriverError",
    "SetupError",
    "ValidationError",
    "DownloadError",
    "KillError",
    "Message",
)


@dataclass(frozen=True)
class Verdict:
    """How an ended allocation ended: an exit code, or Nomad's reason for having none."""

    alloc_id: str
    exit_code: int | None
    error: str | None = None
    stop_job: bool = False
    """Nomad may place the task again by itself (lost, drained): the job must be stopped."""


def events(alloc: dict[str, Any]) -> list[dict[str, Any]]:
    states = alloc.get("TaskStates") or {}
    state = states.get(TASK) or {}
    found = state.get("Events") or []
    return [e for e in found if isinstance(e, dict)]


def describe(event: dict[str, Any]) -> str:
    """``Type: reason`` of one task event."""
    kind = str(event.get("Type") or "event")
    for field in REASON_FIELDS:
        text = event.get(field)
        if text:
            return f"{kind}: {text}"
    return kind


def history(alloc: dict[str, Any], last: int = 6) -> str:
    """The last task events, for a reason: ``Received; Driver: Downloading image; ...``."""
    return "; ".join(describe(e) for e in events(alloc)[-last:])


def _exit_status(event: dict[str, Any]) -> int:
    code = int(event.get("ExitCode") or 0)
    sig = int(event.get("Signal") or 0)
    if code == 0 and sig:
        code = 128 + sig
    return code


def _signal_name(code: int) -> str:
    if code > 128:
        with contextlib.suppress(ValueError):
            return signal.Signals(code - 128).name
    return f"exit code {code}"


def choose(allocs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The allocation whose end is the run's: a lost or evicted one first, else the newest."""
    if not allocs:
        return None
    ordered = sorted(allocs, key=lambda a: (a.get("CreateIndex") or 0, a.get("CreateTime") or 0))
    for alloc in ordered:
        if alloc.get("ClientStatus") == "lost" or alloc.get("DesiredStatus") == "evict":
            return alloc
    return ordered[-1]


def verdict(alloc: dict[str, Any], job: dict[str, Any]) -> Verdict | None:
    """The end of ``alloc``, or ``None`` while it is pending, running or unknown."""
    status = alloc.get("ClientStatus")
    alloc_id = str(alloc.get("ID") or "")
    short = alloc_id[:8]
    node = alloc.get("NodeName") or str(alloc.get("NodeID") or "")[:8] or "unknown node"
    if status not in TERMINAL:
        return None
    evs = events(alloc)
    desired = alloc.get("DesiredStatus")
    desc = alloc.get("DesiredDescription") or ""
    killed = any(e.get("Type") in ("Killing", "Killed") for e in evs)
    terminated = [e for e in evs if e.get("Type") == "Terminated"]
    seen = history(alloc)
    if status == "lost":
        why = alloc.get("ClientDescription") or "its node stopped answering"
        return Verdict(
            alloc_id,
            None,
            f"Nomad lost allocation {short} on node {node}: {why}"
            + (f" (task events: {seen})" if seen else ""),
            stop_job=True,
        )
    if job.get("Stop") and (killed or not terminated):
        how = f", {_signal_name(_exit_status(terminated[-1]))}" if terminated else ""
        return Verdict(
            alloc_id, None, f"cancelled (Nomad stopped the job and killed the task{how})"
        )
    if desired in ("stop", "evict") and killed:
        return Verdict(
            alloc_id,
            None,
            f"Nomad stopped allocation {short} on node {node}"
            + (f": {desc}" if desc else "")
            + (f" (task events: {seen})" if seen else ""),
            stop_job=True,
        )
    if terminated:
        last = terminated[-1]
        details = last.get("Details") or {}
        if str(details.get("oom_killed", "")).lower() == "true":
            return Verdict(
                alloc_id,
                None,
                f"the task ran out of memory and was killed (OOM) on node {node}: give the "
                "module more memory in its resources (memory = <MB>)",
            )
        code = _exit_status(last)
        if code == 0 and status == "failed":
            return Verdict(alloc_id, None, f"Nomad failed allocation {short}: {seen}")
        return Verdict(alloc_id, code)
    if status == "complete":
        return Verdict(alloc_id, 0)
    failing = [e for e in evs if e.get("FailsTask")] or evs
    reason = describe(failing[-1]) if failing else alloc.get("ClientDescription") or "failed"
    return Verdict(
        alloc_id,
        None,
        f"Nomad could not run the task on node {node}: {reason}"
        + (f" (task events: {seen})" if seen and len(evs) > 1 else ""),
    )


def placement_problem(evaluations: list[dict[str, Any]]) -> str:
    """Why Nomad did not place the job, from its evaluations (the newest that says)."""
    ordered = sorted(evaluations, key=lambda e: e.get("CreateIndex") or 0)
    for ev in reversed(ordered):
        failed = ev.get("FailedTGAllocs") or {}
        metric = failed.get(GROUP) or (next(iter(failed.values())) if failed else None)
        if isinstance(metric, dict):
            return _metric_text(metric)
    for ev in reversed(ordered):
        if ev.get("Status") == "failed":
            return f"Nomad's evaluation failed: {ev.get('StatusDescription') or 'no reason given'}"
    if any(ev.get("Status") == "blocked" for ev in ordered):
        return "Nomad is waiting for resources to free up (its evaluation is blocked)"
    if any(ev.get("Status") == "pending" for ev in ordered):
        return (
            "Nomad has not evaluated the job yet (its evaluation is pending: is a server "
            "leader up?)"
        )
    return "Nomad created no allocation for it and gave no reason"


def _metric_text(metric: dict[str, Any]) -> str:
    """Nomad's placement failure metrics (AllocMetric), as ``nomad job status`` words them."""
    parts: list[str] = []
    evaluated = int(metric.get("NodesEvaluated") or 0)
    available = metric.get("NodesAvailable") or {}
    if evaluated == 0:
        empty = sorted(dc for dc, n in available.items() if not n)
        if available and len(empty) == len(available):
            parts.append(f"no client node is available in datacenter(s) {', '.join(empty)}")
        else:
            parts.append("no client node was eligible")
    for what, key in (("constraint", "ConstraintFiltered"), ("node class", "ClassFiltered")):
        for name, count in sorted((metric.get(key) or {}).items()):
            parts.append(f'{what} "{name}" filtered {count} node(s)')
    exhausted = int(metric.get("NodesExhausted") or 0)
    if exhausted:
        parts.append(f"resources exhausted on {exhausted} node(s)")
    for name, count in sorted((metric.get("DimensionExhausted") or {}).items()):
        parts.append(f'dimension "{name}" exhausted on {count} node(s)')
    quota = metric.get("QuotaExhausted") or []
    if quota:
        parts.append(f"quota exhausted: {', '.join(map(str, quota))}")
    if evaluated:
        parts.insert(0, f"{evaluated} node(s) evaluated")
    return "; ".join(parts) if parts else "Nomad found no node that could run it"


__all__ = ["TERMINAL", "Verdict", "choose", "describe", "placement_problem", "verdict"]
