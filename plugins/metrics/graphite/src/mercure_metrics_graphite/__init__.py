"""mercure metrics sink ``graphite``: Graphite's plaintext protocol over TCP to carbon.

Configured by mercure's ``graphite_ip``/``graphite_port`` or by
``plugins.metrics_sinks.graphite``; see the README for every setting.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_metrics_graphite.plaintext import Encoder, series_name
from mercure_metrics_graphite.settings import GraphiteSettings
from mercure_metrics_graphite.sink import GraphiteSendError, GraphiteSink


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    register("graphite", GraphiteSettings, GraphiteSink)


__all__ = ["Encoder", "GraphiteSendError", "GraphiteSettings", "GraphiteSink", "series_name"]
