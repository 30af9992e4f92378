"""The ``prometheus`` metrics sink: the core's metrics on a ``/metrics`` endpoint.

:meth:`PrometheusSink.start` starts prometheus_client's own HTTP server on the configured
address (an address in use is an error that names it; the router then runs without this
sink), :meth:`PrometheusSink.close` stops it. :meth:`PrometheusSink.send` (the sink's thread)
only updates the in-memory :class:`MetricStore`; scrapes read it. Nothing is sent anywhere,
so nothing can fail while Prometheus is away: it reads current totals when it comes back.
"""

from __future__ import annotations

import threading
from typing import Any

from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)

from mercure_metrics_prometheus.settings import PrometheusSettings
from mercure_metrics_prometheus.store import MetricStore

log = get_logger("mercure.metrics.prometheus")


class PrometheusSink(MetricsSink[PrometheusSettings]):
    """Serves the metrics it was sent, as counters, gauges and histograms."""

    def __init__(self, name: str, settings: PrometheusSettings, context: PluginContext) -> None:
        super().__init__(name, settings, context)
        self.store = MetricStore(
            context.appliance_name, settings.prefix, settings.buckets, settings.max_series
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.store)
        if settings.process_metrics:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        """The port actually listened on (useful with port 0)."""

    @property
    def url(self) -> str:
        host, port = self.settings.host_port
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port if self.port is not None else port}/metrics"

    def start(self) -> None:
        host, port = self.settings.host_port
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve Prometheus metrics on {self.settings.address}: "
                f"{exc.strerror or exc}; choose a free address in "
                f"plugins.metrics_sinks.{self.name}.address"
            ) from exc
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        log.info("serving Prometheus metrics", sink=self.name, url=self.url)

    def send(self, metrics: list[Metric]) -> None:
        self.store.add(metrics)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


__all__ = ["PrometheusSink"]
