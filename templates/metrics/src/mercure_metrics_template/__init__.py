"""A metrics-sink plugin to copy and rename: writes metric batches to a JSON-lines file.

Configured as ``"plugins": {"metrics_sinks": {"template": {"path": "/var/log/metrics.jsonl"}}}``.
It shows the whole sink contract: a settings model, ``start`` (open what the sink needs; an
exception leaves the sink out, with the reason logged), ``send`` on the sink's own thread with
a batch (raise and the batch is dropped and counted; the pipeline never waits), and ``close``.
Names follow mercure: :func:`mercure.metrics.metric_path` gives
``mercure.<appliance>.<service>.<name>``.
"""

from __future__ import annotations

import json
import os

from mercure import hookimpl
from mercure.metrics import Metric, MetricsSink, metric_path
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn


class TemplateSinkSettings(PluginSettings):
    """Settings of one ``template`` metrics-sink instance."""

    path: str
    """The JSON-lines file; its folder must exist."""
    prefix: str = "mercure"


class TemplateSink(MetricsSink[TemplateSinkSettings]):
    """One JSON line per metric: dotted name, value, kind, tags and time."""

    def start(self) -> None:
        self._file = open(self.settings.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def send(self, metrics: list[Metric]) -> None:
        appliance = self.context.appliance_name
        lines = [
            json.dumps(
                {
                    "name": metric_path(m, appliance, self.settings.prefix),
                    "value": m.value,
                    "kind": m.kind,
                    "tags": m.tags,
                    "time": m.time,
                },
                sort_keys=True,
            )
            for m in metrics
        ]
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    """Add the ``template`` metrics-sink type."""
    register("template", TemplateSinkSettings, TemplateSink)
