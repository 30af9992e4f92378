"""A module's ``result.json`` with mercure's meaning: notification text and dynamic routing.

``result.json`` may hold any JSON. Two keys of an object mean something to mercure:

* ``__mercure_notification``: ``{"text": "...", "requested": true}``. The texts of every step
  become the completion notification's ``details`` (one line ``<module>: <text>`` per step);
  ``requested`` sends the completion notification of a rule with
  ``notification_trigger_completion_on_request`` even if its completion trigger is off.
* ``__mercure_routing`` (the last step's result only, and only if the rule has
  ``dynamic_routing``): ``{"target": "name" | ["a", "b"]}`` sends the results there instead of
  the rule's targets, if every name is in ``dynamic_routing_allowed_targets`` (when that list
  is not empty) and is a configured target, else the rule's targets are used;
  ``{"discard": true}`` dispatches nothing; ``{"use_alternate_target": true}`` sends to the
  rule's ``conditional_alternate_target``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercure.config import Config
from mercure.jobs.task import Task, TaskProcessing

RESULT_FILE = "result.json"
NOTIFICATION_KEY = "__mercure_notification"
ROUTING_KEY = "__mercure_routing"


class ResultError(ValueError):
    """A ``result.json`` that cannot be used: the message says what is wrong with it."""


def read_result(folder: Path) -> tuple[bool, Any]:
    """``(present, parsed)`` for ``folder/result.json``; :class:`ResultError` if malformed."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return False, None
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ResultError(f"result.json is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ResultError(
            f"result.json is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    check_directives(data)
    return True, data


def check_directives(output: Any) -> None:
    """Reject ``__mercure_notification`` / ``__mercure_routing`` values of the wrong shape."""
    if not isinstance(output, dict):
        return
    note = output.get(NOTIFICATION_KEY)
    if note is not None:
        if not isinstance(note, dict):
            raise ResultError(f"result.json: {NOTIFICATION_KEY} must be an object")
        if "text" in note and not isinstance(note["text"], str):
            raise ResultError(f"result.json: {NOTIFICATION_KEY}.text must be a string")
        if "requested" in note and not isinstance(note["requested"], bool):
            raise ResultError(f"result.json: {NOTIFICATION_KEY}.requested must be true or false")
    routing = output.get(ROUTING_KEY)
    if routing is not None:
        if not isinstance(routing, dict):
            raise ResultError(f"result.json: {ROUTING_KEY} must be an object")
        target = routing.get("target")
        if target is not None and not (
            isinstance(target, str)
            or (isinstance(target, list) and all(isinstance(t, str) for t in target))
        ):
            raise ResultError(
                f"result.json: {ROUTING_KEY}.target must be a target name or a list of names"
            )
        for key in ("discard", "use_alternate_target"):
            if key in routing and not isinstance(routing[key], bool):
                raise ResultError(f"result.json: {ROUTING_KEY}.{key} must be true or false")


def custom_notification(outputs: Sequence[tuple[str, Any]]) -> str:
    """mercure's notification details: ``<module>: <text>`` per step that gave a text."""
    lines = []
    for module, output in outputs:
        note = output.get(NOTIFICATION_KEY) if isinstance(output, dict) else None
        if isinstance(note, dict) and note.get("text"):
            lines.append(f"{module}: {note['text']}")
    return "\n".join(lines)


def notification_requested(outputs: Sequence[tuple[str, Any]]) -> bool:
    """True if any step asked for the completion notification (``requested: true``)."""
    for _module, output in outputs:
        note = output.get(NOTIFICATION_KEY) if isinstance(output, dict) else None
        if isinstance(note, dict) and note.get("requested") is True:
            return True
    return False


def task_outputs(task: Task) -> list[tuple[str, Any]]:
    """``(module, result)`` of every step recorded in a task file (empty without processing)."""
    process = task.process
    steps = [process] if isinstance(process, TaskProcessing) else process
    if not isinstance(steps, list):
        return []
    return [(p.module_name, p.output) for p in steps if isinstance(p, TaskProcessing)]


def completion_notice(config: Config, task: Task, rule_name: str) -> tuple[str, bool]:
    """The ``details`` and the ``always`` flag of a job's completion notification for a rule."""
    outputs = task_outputs(task)
    if not outputs:
        return "", False
    rule = config.rules.get(rule_name)
    always = bool(
        rule and rule.notification_trigger_completion_on_request and notification_requested(outputs)
    )
    return custom_notification(outputs), always


@dataclass(frozen=True)
class RoutingDecision:
    """Where a processing job's results go, and what the operator should know about it."""

    targets: list[str]
    note: str | None = None


def decide_routing(
    config: Config, rule_name: str | None, static_targets: list[str], last_output: Any
) -> RoutingDecision:
    """mercure's dynamic routing: the last step's ``__mercure_routing`` over the rule's targets."""
    directive = last_output.get(ROUTING_KEY) if isinstance(last_output, dict) else None
    if not directive:
        return RoutingDecision(static_targets)
    rule = config.rules.get(rule_name or "")
    if rule is None or not rule.dynamic_routing:
        return RoutingDecision(
            static_targets,
            f"{ROUTING_KEY} ignored: rule '{rule_name}' does not enable dynamic_routing",
        )
    if directive.get("discard") is True:
        return RoutingDecision([], f"the module asked to discard the results ({ROUTING_KEY})")
    requested = directive.get("target")
    if not requested:
        if directive.get("use_alternate_target") is True:
            alternate = (rule.model_extra or {}).get("conditional_alternate_target")
            if isinstance(alternate, str) and alternate in config.targets:
                return RoutingDecision(
                    [alternate], f"sent to the rule's alternate target '{alternate}'"
                )
            if alternate:
                return RoutingDecision(
                    static_targets,
                    f"alternate target '{alternate}' is not configured; the rule's targets used",
                )
        return RoutingDecision(static_targets)
    names = [requested] if isinstance(requested, str) else list(requested)
    fallback = f"the rule's target(s) {', '.join(static_targets) or '(none)'} used instead"
    allowed = rule.dynamic_routing_allowed_targets
    refused = [t for t in names if allowed and t not in allowed]
    if refused:
        return RoutingDecision(
            static_targets,
            f"{ROUTING_KEY} refused: {', '.join(refused)} not in the rule's "
            f"dynamic_routing_allowed_targets ({', '.join(allowed)}); {fallback}",
        )
    unknown = [t for t in names if t not in config.targets]
    if unknown:
        return RoutingDecision(
            static_targets,
            f"{ROUTING_KEY} refused: target(s) {', '.join(unknown)} not configured; {fallback}",
        )
    return RoutingDecision(
        list(dict.fromkeys(names)), f"sent to {', '.join(names)} as the module asked"
    )


__all__ = [
    "NOTIFICATION_KEY",
    "RESULT_FILE",
    "ROUTING_KEY",
    "ResultError",
    "RoutingDecision",
    "check_directives",
    "completion_notice",
    "custom_notification",
    "decide_routing",
    "notification_requested",
    "read_result",
    "task_outputs",
]
