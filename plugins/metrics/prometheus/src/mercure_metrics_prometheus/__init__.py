"""mercure metrics sink ``prometheus``: a ``/metrics`` endpoint for Prometheus to scrape.

Configured by ``plugins.metrics_sinks.prometheus`` with its ``address``; see the README.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_metrics_prometheus.settings import PrometheusSettings, parse_address
from mercure_metrics_prometheus.sink import PrometheusSink
from mercure_metrics_prometheus.store import MetricStore, family_name


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    register("prometheus", PrometheusSettings, PrometheusSink)


__all__ = ["MetricStore", "PrometheusSettings", "PrometheusSink", "family_name", "parse_address"]
