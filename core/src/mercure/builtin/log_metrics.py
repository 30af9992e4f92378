"""The ``log`` metrics sink: writes metric batches to the log at DEBUG level."""

from __future__ import annotations

from mercure import hookimpl
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink
from mercure.registry import RegisterFn

log = get_logger("mercure.metrics")


class LogMetricsSink(MetricsSink):
    """Logs each metric; useful to see what an InfluxDB or Graphite sink would receive."""

    def send(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            log.debug("metric", metric=metric.name, value=metric.value, **metric.tags)


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    register("log", None, LogMetricsSink)
