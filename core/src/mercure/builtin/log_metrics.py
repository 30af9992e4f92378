"""The ``log`` metrics sink: writes metric batches to the log at DEBUG level.

Switched on with ``"plugins": {"metrics_sinks": {"log": {}}}``; useful to see what an InfluxDB
or Graphite sink would receive.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink, metric_path
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn

log = get_logger("mercure.metrics")


class LogMetricsSettings(PluginSettings):
    """The ``log`` metrics sink has no settings."""


class LogMetricsSink(MetricsSink[LogMetricsSettings]):
    """Logs each metric with mercure's dotted name."""

    def send(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            log.debug(
                "metric",
                metric=metric_path(metric, self.context.appliance_name),
                value=metric.value,
                kind=metric.kind,
                **metric.tags,
            )


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    register("log", LogMetricsSettings, LogMetricsSink)
