"""The core's metrics as Prometheus families: counters, gauges and histograms.

Names follow Prometheus' conventions: ``<prefix>_<name>`` in snake case (``incoming.files``
becomes ``mercure_incoming_files_total``, a counter), timings become histograms in seconds
(``dispatch.duration`` becomes ``mercure_dispatch_duration_seconds``), gauges keep their name
(``mercure_spool_free_bytes``). Labels: ``service`` (the part of the router that measured it),
``appliance`` (mercure's ``appliance_name``) and the metric's own tags (``target``,
``action``, ...). Prometheus adds ``job`` and ``instance`` itself when it scrapes.

The store is filled by the sink's thread and read by the HTTP server's threads under one
lock. Counters only grow (a negative increment is ignored, with a warning), as Prometheus'
``rate()`` expects; they start at zero when the router starts.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mercure.logs import get_logger
from mercure.metrics import Metric
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = get_logger("mercure.metrics.prometheus")

FamilyKind = Literal["counter", "gauge", "histogram"]
LabelSet = tuple[tuple[str, str], ...]

#: Bucket bounds (seconds) for timings: a dispatch takes from milliseconds to many minutes.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

#: What the operator's metrics mean, for ``# HELP`` (by the core's metric name).
HELP = {
    "incoming.files": "DICOM instances received and routed",
    "incoming.series": "Series received and routed",
    "jobs.created": "Jobs created by the router, by action (route, process, discard, ...)",
    "jobs.completed": "Jobs completed",
    "jobs.errors": "Jobs moved to the error folder",
    "dispatch.instances": "Instances delivered, by target",
    "dispatch.failures": "Failed delivery attempts, by target",
    "dispatch.retries": "Deliveries scheduled for a retry, by target",
    "dispatch.duration": "Seconds from a job's creation to its completed delivery",
    "notifications.sent": "Notifications delivered",
    "notifications.given_up": "Notifications given up",
    "notifications.failures": "Failed notification attempts",
    "events.boot": "Service starts",
    "events.run": "Service heartbeats",
    "events.shutdown": "Service stops",
    "queue.incoming_series": "Series waiting in the incoming folder",
    "queue.notifications": "Notifications waiting in the outbox",
    "spool.free_bytes": "Free bytes on the spool's file system",
    "spool.free_percent": "Free space on the spool's file system, in percent",
}

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_RESERVED_LABELS = {"service", "appliance", "le", "quantile", "job", "instance"}


def _snake(text: str, invalid: re.Pattern[str]) -> str:
    text = invalid.sub("_", text.replace(".", "_").replace("-", "_"))
    text = re.sub(r"_+", "_", text).strip("_")
    return "_" + text if text[:1].isdigit() else text


def family_name(metric: Metric, prefix: str) -> tuple[str, FamilyKind]:
    """The Prometheus name (a counter's without ``_total``, which is added on output)."""
    base = _snake(f"{prefix}_{metric.name}" if prefix else metric.name, _INVALID_NAME) or "metric"
    if metric.kind == "counter":
        return base.removesuffix("_total") or base, "counter"
    if metric.kind == "timing":
        return (base if base.endswith("_seconds") else base + "_seconds"), "histogram"
    return base, "gauge"


def label_name(tag: str) -> str:
    """A tag key as a label name; one that Prometheus or this sink reserves gets ``tag_``."""
    name = _snake(tag, _INVALID_LABEL) or "tag"
    if name in _RESERVED_LABELS or name.startswith("__"):
        name = "tag_" + name.lstrip("_")
    return name


@dataclass
class _Histogram:
    counts: list[int]
    total: float = 0.0
    count: int = 0


@dataclass
class _Family:
    kind: FamilyKind
    help: str
    series: dict[LabelSet, float | _Histogram] = field(default_factory=dict)


class MetricStore(Collector):
    """Holds the current value of every series; a ``prometheus_client`` collector."""

    def __init__(
        self,
        appliance: str,
        prefix: str = "mercure",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int = 10_000,
    ) -> None:
        self.appliance = appliance
        self.prefix = prefix
        self.buckets = sorted(float(b) for b in buckets if math.isfinite(b))
        self.max_series = max_series
        self.series_count = 0
        self.dropped = 0
        """Metrics not stored: a full store, a kind clash, a negative or non-finite value."""
        self._families: dict[str, _Family] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def add(self, metrics: Iterable[Metric]) -> None:
        with self._lock:
            for metric in metrics:
                self._add(metric)

    def _add(self, metric: Metric) -> None:
        value = float(metric.value)
        name, kind = family_name(metric, self.prefix)
        if not math.isfinite(value):
            return self._drop(name, f"{metric.name} has the value {value}")
        family = self._families.get(name)
        if family is None:
            help_text = HELP.get(metric.name, f"mercure's {metric.name}")
            family = self._families[name] = _Family(kind, help_text)
        elif family.kind != kind:
            return self._drop(name, f"{metric.name} is a {family.kind} here, not a {metric.kind}")
        labels = self._labels(metric)
        current = family.series.get(labels)
        if current is None:
            if self.series_count >= self.max_series:
                return self._drop("max_series", f"more than {self.max_series} series")
            self.series_count += 1
        if kind == "counter":
            if value < 0:
                return self._drop(name, f"{metric.name} is a counter and cannot decrease")
            previous = current if isinstance(current, float) else 0.0
            family.series[labels] = previous + value
        elif kind == "gauge":
            family.series[labels] = value
        else:
            hist = current if isinstance(current, _Histogram) else None
            if hist is None:
                hist = _Histogram([0] * len(self.buckets))
                family.series[labels] = hist
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    hist.counts[i] += 1
            hist.total += value
            hist.count += 1
        return None

    def _labels(self, metric: Metric) -> LabelSet:
        labels = {"service": metric.service, "appliance": self.appliance}
        for key, val in metric.tags.items():
            if key and val:
                labels[label_name(key)] = str(val)
        return tuple(sorted(labels.items()))

    def _drop(self, key: str, reason: str) -> None:
        self.dropped += 1
        if key not in self._warned:
            self._warned.add(key)
            log.warning("metric not exported to Prometheus", reason=reason)

    def collect(self) -> Iterator[PromFamily]:
        with self._lock:  # a consistent copy; the output is built outside the lock
            families = [
                (name, family.kind, family.help, [(labels, _copy(v)) for labels, v in
                                                  family.series.items()])
                for name, family in sorted(self._families.items())
            ]  # fmt: skip
        for name, kind, help_text, series in families:
            names = sorted({k for labels, _ in series for k, _ in labels})
            out: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if kind == "counter":
                out = CounterMetricFamily(name, help_text, labels=names)
            elif kind == "gauge":
                out = GaugeMetricFamily(name, help_text, labels=names)
            else:
                out = HistogramMetricFamily(name, help_text, labels=names)
            for labels, value in series:
                as_dict = dict(labels)
                values = [as_dict.get(k, "") for k in names]
                if isinstance(value, _Histogram):
                    assert isinstance(out, HistogramMetricFamily)
                    buckets = [
                        (floatToGoString(b), float(c))
                        for b, c in zip(self.buckets, value.counts, strict=True)
                    ]
                    buckets.append(("+Inf", float(value.count)))
                    out.add_metric(values, buckets, value.total)
                else:
                    assert not isinstance(out, HistogramMetricFamily)
                    out.add_metric(values, value)
            # A series without one of the family's tags leaves that label out (not empty).
            out.samples = [
                sample._replace(labels={k: v for k, v in sample.labels.items() if v != ""})
                for sample in out.samples
            ]
            yield out


def _copy(value: float | _Histogram) -> float | _Histogram:
    if isinstance(value, _Histogram):
        return _Histogram(list(value.counts), value.total, value.count)
    return value


__all__ = ["DEFAULT_BUCKETS", "HELP", "MetricStore", "family_name", "label_name"]
