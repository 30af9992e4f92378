"""The contract for metrics sinks (InfluxDB, Graphite, Prometheus, log).

The core derives metrics from the task events it emits and from periodic gauges, and puts them
into a bounded in-memory buffer per sink (:mod:`mercure.metrics_hub`). Each sink's
:meth:`MetricsSink.send` runs on that sink's own thread with batches; a sink that raises or
blocks only loses its own batches (counted, with a warning), never delays the pipeline.

Names are mercure's where mercure has one (``incoming.files``, ``incoming.series``,
``events.boot``, ...). :func:`metric_path` gives mercure's dotted path
``mercure.<appliance>.<service>.<name>`` for sinks with a flat namespace (Graphite).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from mercure.lifecycle import Plugin, SettingsT

MetricKind = Literal["counter", "gauge", "timing"]


@dataclass(frozen=True)
class Metric:
    """One measurement, e.g. ``Metric("dispatch.instances", 20, {"target": "pacs"})``.

    ``kind``: a ``counter`` value is an increment since the last one; a ``gauge`` is the current
    value; a ``timing`` is one duration in seconds. ``service`` is the part of the router that
    measured it (``receiver``, ``router``, ``dispatcher``, ...).
    """

    name: str
    value: float
    tags: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    kind: MetricKind = "counter"
    service: str = "router"


def metric_path(metric: Metric, appliance: str, prefix: str = "mercure") -> str:
    """mercure's dotted name: ``<prefix>.<appliance>.<service>.<name>``."""
    parts = [p for p in (prefix, appliance, metric.service, metric.name) if p]
    return ".".join(p.replace(" ", "_") for p in parts)


class MetricsSink(Plugin[SettingsT], ABC):
    """Receives batches of metrics on its own thread (one thread per sink instance)."""

    @abstractmethod
    def send(self, metrics: list[Metric]) -> None:
        """Deliver a batch; raise on failure (the batch is dropped and counted)."""


__all__ = ["Metric", "MetricKind", "MetricsSink", "metric_path"]
