"""Metrics from the pipeline to the sinks without ever making the pipeline wait.

Every sink instance has a bounded in-memory buffer and a thread of its own. :meth:`record`
only appends to those buffers (a full buffer drops the newest metrics, counted); each thread
takes batches and calls its sink's ``send``. A sink that raises loses that batch (counted, with
a warning at most once a minute); a sink that blocks only fills its own buffer. Metrics are
best effort by design: images and their history never depend on them.

:func:`metrics_for_event` derives the operator's metrics from the task events, and the
runtime adds periodic gauges (jobs per state, queue depths, spool disk free).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink

log = get_logger("mercure.metrics")

BUFFER_SIZE = 10_000
BATCH_SIZE = 500
FLUSH_INTERVAL = 1.0
WARN_INTERVAL = 60.0


@dataclass
class SinkStats:
    """What happened to one sink's metrics: sent, dropped because full, dropped on failure."""

    sent: int = 0
    dropped_full: int = 0
    dropped_failed: int = 0
    last_error: str = ""

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed


@dataclass
class _SinkWorker:
    name: str
    sink: MetricsSink[Any]
    buffer: deque[Metric]
    capacity: int
    stats: SinkStats = field(default_factory=SinkStats)
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    last_warning: float = 0.0


class MetricsHub:
    """Fans metrics out to sink threads; see the module docstring."""

    def __init__(
        self,
        sinks: Iterable[tuple[str, MetricsSink[Any]]],
        *,
        buffer_size: int = BUFFER_SIZE,
        batch_size: int = BATCH_SIZE,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._workers = [_SinkWorker(name, sink, deque(), buffer_size) for name, sink in sinks]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._gauge_sources: list[tuple[float, Callable[[], list[Metric]]]] = []
        self._gauge_thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return bool(self._workers)

    def stats(self) -> dict[str, SinkStats]:
        return {w.name: w.stats for w in self._workers}

    def record(self, *metrics: Metric) -> None:
        """Queue metrics for every sink; never blocks, never raises."""
        if not self._workers or not metrics:
            return
        with self._lock:
            for worker in self._workers:
                room = worker.capacity - len(worker.buffer)
                if room >= len(metrics):
                    worker.buffer.extend(metrics)
                else:
                    worker.buffer.extend(metrics[: max(room, 0)])
                    worker.stats.dropped_full += len(metrics) - max(room, 0)
                if len(worker.buffer) >= self.batch_size:
                    worker.wake.set()

    def add_gauges(self, interval: float, source: Callable[[], list[Metric]]) -> None:
        """Call ``source`` every ``interval`` seconds (on the hub's thread) and record it."""
        self._gauge_sources.append((interval, source))

    def start(self) -> None:
        for worker in self._workers:
            worker.thread = threading.Thread(
                target=self._run, args=(worker,), name=f"metrics-{worker.name}", daemon=True
            )
            worker.thread.start()
        if self._gauge_sources and self._workers:
            self._gauge_thread = threading.Thread(
                target=self._gauges, name="metrics-gauges", daemon=True
            )
            self._gauge_thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (bounded by ``timeout``), stop the threads, close the sinks."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.wake.set()
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
            try:
                worker.sink.close()
            except Exception as exc:
                log.warning("closing metrics sink failed", sink=worker.name, error=str(exc))

    def _take(self, worker: _SinkWorker) -> list[Metric]:
        with self._lock:
            count = min(self.batch_size, len(worker.buffer))
            return [worker.buffer.popleft() for _ in range(count)]

    def _run(self, worker: _SinkWorker) -> None:
        while True:
            stopping = self._stop.is_set()
            batch = self._take(worker)
            if batch:
                self._send(worker, batch)
                continue
            if stopping:
                return
            worker.wake.wait(self.flush_interval)
            worker.wake.clear()

    def _send(self, worker: _SinkWorker, batch: list[Metric]) -> None:
        try:
            worker.sink.send(batch)
        except Exception as exc:
            worker.stats.dropped_failed += len(batch)
            worker.stats.last_error = f"{exc.__class__.__name__}: {exc}"
            now = time.monotonic()
            if now - worker.last_warning >= WARN_INTERVAL:
                worker.last_warning = now
                log.warning(
                    "metrics sink failed; its metrics are dropped until it recovers",
                    sink=worker.name,
                    error=worker.stats.last_error,
                    dropped_so_far=worker.stats.dropped,
                )
            return
        worker.stats.sent += len(batch)

    def _gauges(self) -> None:
        due: dict[int, float] = {}  # sources may be added after start (a receiver's counters)
        while not self._stop.is_set():
            now = time.monotonic()
            for i, (interval, source) in enumerate(list(self._gauge_sources)):
                if now < due.get(i, 0.0):
                    continue
                due[i] = now + interval
                try:
                    self.record(*source())
                except Exception as exc:
                    log.warning("gauge source failed", error=str(exc))
            self._stop.wait(min(interval for interval, _ in self._gauge_sources))


def metrics_for_event(event: TaskEvent) -> list[Metric]:
    """The metrics an operator needs from one task event.

    ``COMPLETED`` and ``MOVED_TO_ERROR`` come from the dispatcher, or from the processor
    (``extra["service"] == "processor"``: a ``process`` job done, a processing job failed).
    """
    t = event.time
    target = {"target": event.target} if event.target else {}
    module = {"module": event.target} if event.target else {}
    service = str(event.extra.get("service") or "dispatcher")
    duration = event.extra.get("duration")
    timed = isinstance(duration, int | float) and not isinstance(duration, bool)
    match event.type:
        case TaskEventType.ROUTED:
            return [Metric("jobs.created", 1, {"action": "route"}, t)]
        case TaskEventType.QUEUED_FOR_PROCESSING:
            return [Metric("jobs.created", 1, {"action": "process"}, t)]
        case TaskEventType.DISCARDED:
            return [Metric("jobs.created", 1, {"action": "discard"}, t)]
        case TaskEventType.NOTIFICATION:
            return [Metric("jobs.created", 1, {"action": "notification"}, t)]
        case TaskEventType.NOTIFICATION_SENT:
            return [Metric("notifications.sent", 1, target, t, service="notifier")]
        case TaskEventType.NOTIFICATION_GIVEN_UP:
            return [Metric("notifications.given_up", 1, target, t, service="notifier")]
        case TaskEventType.DELIVERED:
            return [Metric("dispatch.instances", event.file_count, target, t, service="dispatcher")]
        case TaskEventType.RETRY_SCHEDULED | TaskEventType.DELIVERY_FAILED:
            return [
                Metric("dispatch.failures", 1, target, t, service="dispatcher"),
                Metric("dispatch.retries", 1, target, t, service="dispatcher"),
            ]
        case TaskEventType.MOVED_TO_ERROR if service == "processor":
            return [Metric("jobs.errors", 1, {}, t, service="processor")]
        case TaskEventType.MOVED_TO_ERROR:
            return [
                Metric("jobs.errors", 1, {}, t, service="dispatcher"),
                Metric("dispatch.failures", 1, target, t, service="dispatcher"),
            ]
        case TaskEventType.COMPLETED if service == "processor":
            return [Metric("jobs.completed", 1, {}, t, service="processor")]
        case TaskEventType.COMPLETED:
            found = [Metric("jobs.completed", 1, target, t, service="dispatcher")]
            if timed:
                found.append(
                    Metric("dispatch.duration", float(duration), target, t, "timing", "dispatcher")
                )
            return found
        case TaskEventType.PROCESSING_STARTED:
            return [Metric("processing.started", 1, module, t, service="processor")]
        case TaskEventType.MODULE_FINISHED:
            outcome = {"outcome": "success" if event.extra.get("exit_code") == 0 else "failure"}
            found = [Metric("processing.module_runs", 1, {**module, **outcome}, t,
                            service="processor")]  # fmt: skip
            if timed:
                found.append(Metric("processing.module_duration", float(duration), module, t,
                                    "timing", "processor"))  # fmt: skip
            return found
        case TaskEventType.PROCESSING_FINISHED | TaskEventType.PROCESSING_FAILED:
            ok = event.type == TaskEventType.PROCESSING_FINISHED
            found = [Metric("processing.completed" if ok else "processing.failures", 1, module, t,
                            service="processor")]  # fmt: skip
            if timed:
                found.append(Metric("processing.duration", float(duration), module, t,
                                    "timing", "processor"))  # fmt: skip
            return found
        case _:
            return []


__all__ = ["MetricsHub", "SinkStats", "metrics_for_event"]
