"""Graphite's plaintext protocol for the core's metrics: ``<path> <value> <timestamp>\\n``.

The path is mercure's (``<prefix>.<appliance>.<service>.<name>``, e.g.
``mercure.master.router.incoming.files``), so existing Graphite dashboards for mercure keep
working. A metric's tags (``target``, ``action``, ...) are written, by ``tag_style``:

* ``path`` (default): appended as ``.<key>.<value>`` in key order, e.g.
  ``mercure.master.dispatcher.dispatch.instances.target.pacs``;
* ``tagged``: as Graphite 1.1 tags, ``...dispatch.instances;target=pacs``;
* ``drop``: left out (the values of one path are then combined as below).

carbon keeps one value per path and time slot (the last one written). So that increments are
not lost when several land in one second, a batch is combined per path and second: counter
increments are summed, a gauge keeps its last value, timings their mean. With
``counters="totals"`` a counter is written as its running total since the router started
(use ``nonNegativeDerivative()`` in Graphite), which survives coarse retentions and lost
batches alike.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mercure.metrics import Metric, metric_path

TagStyle = Literal["path", "tagged", "drop"]
CounterStyle = Literal["increments", "totals"]

_PATH_PART = re.compile(r"[^A-Za-z0-9_\-]")  # anything else would add a level or break a line
_TAG_VALUE = re.compile(r"[\s;~]")  # Graphite tag values may not hold these
_TAG_KEY = re.compile(r"[\s;!^=~]")


def _part(text: str) -> str:
    return _PATH_PART.sub("_", text) or "_"


def series_name(metric: Metric, appliance: str, prefix: str, tag_style: TagStyle) -> str:
    """The Graphite path (with ``;tags`` in ``tagged`` style) of one metric."""
    base = ".".join(_part(p) for p in metric_path(metric, appliance, prefix).split(".") if p)
    tags = sorted((k, v) for k, v in metric.tags.items() if k and v)
    if not tags or tag_style == "drop":
        return base
    if tag_style == "tagged":
        return base + "".join(f";{_TAG_KEY.sub('_', k)}={_TAG_VALUE.sub('_', v)}" for k, v in tags)
    return base + "".join(f".{_part(k)}.{_part(v)}" for k, v in tags)


def format_value(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass
class _Slot:
    kind: str
    value: float
    count: int = 1


class Encoder:
    """Turns batches into plaintext lines; keeps the running totals of ``counters="totals"``."""

    def __init__(
        self,
        appliance: str,
        prefix: str = "mercure",
        tag_style: TagStyle = "path",
        counters: CounterStyle = "increments",
    ) -> None:
        self.appliance = appliance
        self.prefix = prefix
        self.tag_style = tag_style
        self.counters = counters
        self.totals: dict[str, float] = {}

    def lines(self, metrics: Iterable[Metric]) -> list[str]:
        """One line per path and second; non-finite values are left out (carbon cannot store
        them)."""
        slots: dict[tuple[str, int], _Slot] = {}
        for metric in metrics:
            value = float(metric.value)
            if not math.isfinite(value):
                continue
            path = series_name(metric, self.appliance, self.prefix, self.tag_style)
            second = int(metric.time)
            if metric.kind == "counter" and self.counters == "totals":
                value = self.totals[path] = self.totals.get(path, 0.0) + value
                slots[(path, second)] = _Slot("gauge", value)
                continue
            slot = slots.get((path, second))
            if slot is None or slot.kind != metric.kind:
                slots[(path, second)] = _Slot(metric.kind, value)
            elif metric.kind == "counter":
                slot.value += value
            elif metric.kind == "timing":
                slot.value = (slot.value * slot.count + value) / (slot.count + 1)
                slot.count += 1
            else:
                slot.value = value
        return [
            f"{path} {format_value(slot.value)} {second}"
            for (path, second), slot in sorted(slots.items(), key=lambda item: item[0][1])
        ]


__all__ = ["CounterStyle", "Encoder", "TagStyle", "format_value", "series_name"]
