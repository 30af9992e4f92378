"""Job priorities as mercure has them: ``urgent`` first, ``normal`` never starved, ``offpeak``
only inside the off-peak window.

mercure's dispatcher and processor take an urgent job on two picks out of three and a normal
one on the third (``counter % 3 < 2``), so a steady stream of urgent jobs slows normal ones
down but never stops them. A job's priority is that of its rule (``applied_rule``; else the
most urgent of its triggered rules), read from the running configuration, so that a changed
priority applies to jobs already waiting. ``offpeak`` jobs count as normal inside the window
``offpeak_start..offpeak_end`` (a window that passes midnight, 22:00-06:00, is the usual case)
and are not started outside it.

The window is meant in the zone ``local_time`` names (empty: the host's zone); the wall-clock
time is computed from the epoch time for each check, so it stays right across DST changes.
Callers pass ``now`` so that tests inject the time instead of sleeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, tzinfo
from datetime import time as clock_time
from typing import Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mercure.config import Config

Priority = Literal["urgent", "normal", "offpeak"]
PRIORITIES: tuple[Priority, ...] = ("urgent", "normal", "offpeak")
RANK = {"urgent": 0, "normal": 1, "offpeak": 2}

T = TypeVar("T")


def parse_clock(text: str) -> clock_time:
    """``HH:MM`` (mercure's format for ``offpeak_start``/``offpeak_end``); ValueError if not."""
    try:
        return datetime.strptime(text.strip(), "%H:%M").time()
    except (ValueError, AttributeError):
        raise ValueError(f"'{text}' is not a time of day as HH:MM, e.g. 22:00") from None


def zone(name: str) -> tzinfo | None:
    """The zone ``local_time`` names; None for the host's zone. ValueError if unknown."""
    if not name.strip():
        return None
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{name}'; use an IANA name such as 'Europe/Berlin' or 'UTC', "
            "or leave it empty for the host's zone"
        ) from None


def config_errors(config: Config) -> list[tuple[str, str]]:
    """The off-peak window and zone must be readable (mercure silently ignores bad ones)."""
    errors: list[tuple[str, str]] = []
    for field in ("offpeak_start", "offpeak_end"):
        try:
            parse_clock(getattr(config, field))
        except ValueError as exc:
            errors.append((field, str(exc)))
    try:
        zone(config.local_time)
    except ValueError as exc:
        errors.append(("local_time", str(exc)))
    return errors


def in_window(start: clock_time, end: clock_time, now: clock_time) -> bool:
    """mercure's window test: both ends included; a window past midnight wraps around."""
    if start < end:
        return start <= now <= end
    return now >= start or now <= end


@dataclass(frozen=True)
class OffpeakWindow:
    start: clock_time
    end: clock_time
    tz: tzinfo | None

    @classmethod
    def from_config(cls, config: Config) -> OffpeakWindow:
        try:
            return cls(parse_clock(config.offpeak_start), parse_clock(config.offpeak_end),
                       zone(config.local_time))  # fmt: skip
        except ValueError:
            # A configuration that loaded was checked; an unchecked one behaves as mercure's
            # does with unreadable times: off-peak all the time.
            return cls(clock_time(0, 0), clock_time(23, 59, 59), None)

    def local(self, now: float) -> datetime:
        if self.tz is None:
            return datetime.fromtimestamp(now).astimezone()
        return datetime.fromtimestamp(now, self.tz)

    def contains(self, now: float | None = None) -> bool:
        """True if the epoch time ``now`` lies inside the window, in the configured zone."""
        moment = self.local(time.time() if now is None else now)
        return in_window(self.start, self.end, moment.time().replace(tzinfo=None))


def rule_priority(config: Config, applied_rule: str | None, triggered: object) -> Priority:
    """A job's priority from the running configuration (mercure's ``get_priority``)."""
    rule = config.rules.get(applied_rule or "")
    if rule is not None:
        return rule.priority
    found: list[Priority] = []
    if isinstance(triggered, dict):
        found = [config.rules[n].priority for n in triggered if n in config.rules]
    return min(found, key=RANK.__getitem__) if found else "normal"


class PriorityPicker:
    """mercure's 2:1 interleaving of urgent and normal picks, kept across passes."""

    def __init__(self) -> None:
        self.counter = 0

    def choose(self, has_urgent: bool, has_normal: bool) -> Literal["urgent", "normal"] | None:
        """Which kind the next pick takes: urgent on two picks of three, if there is one."""
        if not has_urgent and not has_normal:
            return None
        prefer_urgent = self.counter % 3 < 2
        self.counter += 1
        if prefer_urgent:
            return "urgent" if has_urgent else "normal"
        return "normal" if has_normal else "urgent"

    def pick(self, urgent: list[T], normal: list[T]) -> T | None:
        """Take the next item (removing it from its list); None when both are empty.

        ``offpeak`` items go into ``normal`` while the window is open and are left out
        otherwise (the caller decides with :meth:`OffpeakWindow.contains`).
        """
        kind = self.choose(bool(urgent), bool(normal))
        if kind is None:
            return None
        return (urgent if kind == "urgent" else normal).pop(0)


__all__ = [
    "PRIORITIES",
    "OffpeakWindow",
    "Priority",
    "PriorityPicker",
    "config_errors",
    "in_window",
    "parse_clock",
    "rule_priority",
    "zone",
]
