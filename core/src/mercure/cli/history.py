"""How the command line prints the ledger: times, durations, a job's history in order."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from mercure.ledger.query import JobHistory

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, now: float | None = None) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` (ago) or an ISO date/time; ``ValueError`` otherwise."""
    now = time.time() if now is None else now
    match = _DURATION.match(value)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"'{value}' is neither a duration (7d, 12h, 30m, 90s) nor a date "
            "(2026-01-31 or 2026-01-31T08:00)"
        ) from None


def stamp(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def _attempt(a: dict[str, Any]) -> str:
    text = f"attempt   {a.get('target')}: {a.get('delivered', 0)} delivered"
    if a.get("failed"):
        text += f", {a['failed']} failed"
    if a.get("error"):
        text += f": {a['error']}"
    return text


def _event_lines(e: dict[str, Any]) -> list[tuple[float, str]]:
    """Timeline entries of one event: (time, text); attempts carry their own times."""
    t = float(e.get("time") or 0)
    kind = str(e.get("type"))
    x = e.get("extra") or {}
    target, count, rule, info = e.get("target"), e.get("file_count"), e.get("rule"), e.get("info")
    lines: list[tuple[float, str]] = []
    for a in x.get("attempts") or []:
        if isinstance(a, dict):
            lines.append((float(a.get("at") or t), _attempt(a)))
    if kind in ("route", "process", "discard", "notification") and not x.get("parent_id"):
        lines.append((t, f"received  series {e.get('series_uid')}: {count} instance(s)"))
    if kind == "route":
        parent = f" (results of job {x['parent_id']})" if x.get("parent_id") else ""
        lines.append((t, f"routed    rule {rule or '-'} -> {target}{parent}"))
    elif kind == "process":
        lines.append(
            (t, f"routed    rule {rule} -> processing" + (f", then {target}" if target else ""))
        )
    elif kind == "discard":
        lines.append((t, f"discarded {'by rule ' + rule if rule else 'no rule matched'}"))
    elif kind == "notification":
        lines.append((t, f"notified  rule {rule} (notification only)"))
    elif kind == "dispatch":
        lines.append((t, f"delivered {target}: {count} instance(s)"))
    elif kind == "delay":
        nxt = x.get("next_retry_at")
        when = f" at {stamp(nxt)}" if nxt else ""
        lines.append((t, f"retry     {x.get('retry', '?')} scheduled{when}: {info}"))
    elif kind == "complete":
        lines.append((t, "completed every target confirmed every instance"))
    elif kind == "error":
        lines.append((t, f"error     moved to error/: {info}"))
    elif kind == "retry":
        who = f" by {x['operator']}" if x.get("operator") else ""
        lines.append((t, f"retry     manual retry{who}" + (f": {info}" if info else "")))
    elif kind == "study_force":
        who = f" by {x['operator']}" if x.get("operator") else ""
        lines.append((t, f"study     completion forced{who}"))
    elif kind in ("notification_sent", "notification_given_up"):
        outcome = "sent" if kind == "notification_sent" else "given up"
        lines.append((t, f"notice    rule {rule} via {target}: {outcome} ({info})"))
    elif kind.startswith("process_"):
        code = x.get("exit_code")
        detail = f", exit code {code}" if code is not None else ""
        lines.append(
            (t, f"{kind.replace('_', ' ')}: {target}{detail}" + (f": {info}" if info else ""))
        )
    else:
        lines.append((t, f"{kind} {target or ''} {info or ''}".rstrip()))
    return lines


def history_lines(history: JobHistory, *, instances: bool = False) -> list[str]:
    """The job's history, one line per step, in the order things happened."""
    timeline: list[tuple[float, int, str]] = []
    for i, event in enumerate(history.events):
        for t, text in _event_lines(event):
            timeline.append((t, i, text))
    timeline.sort(key=lambda item: (item[0], item[1]))
    out = [f"  {stamp(t)}  {text}" for t, _, text in timeline]
    tags = history.job.get("tags") or {}
    if tags.get("SenderAET") or tags.get("SenderAddress"):
        out.insert(
            0,
            f"  sender {tags.get('SenderAET', '?')} at {tags.get('SenderAddress', '?')}, "
            f"patient {tags.get('PatientID', '?')}, accession {tags.get('AccessionNumber', '?')}",
        )
    if history.deliveries:
        by_target: dict[str, int] = {}
        for d in history.deliveries:
            by_target[d["target"]] = by_target.get(d["target"], 0) + 1
        out.append(
            "  instances delivered: "
            + ", ".join(f"{n} to {target}" for target, n in sorted(by_target.items()))
        )
        if instances:
            for d in history.deliveries:
                out.append(f"    {d['target']}  {d['sop_instance_uid']}  {d['digest']}")
    for run in history.processing:
        out.append(
            f"  processing {run['module']}: {run['outcome']}, exit code {run['exit_code']}"
            + (", result.json kept" if run.get("result") is not None else "")
        )
    for job in history.related:
        out.append(
            f"  related job {job['task_id']}: {job['action']} -> {job['targets'] or '-'}, "
            f"{job['state']}"
        )
    return out


__all__ = ["history_lines", "parse_time", "stamp"]
