"""A routed series, then a scrape: the received, routed and delivered counts are there, read
with prometheus_client's text parser and, where Debian's Prometheus is installed, by a real
Prometheus scraping the endpoint."""

from __future__ import annotations

import socket
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from mercure.testing import (
    RunningRouter,
    dcmtk_storescu,
    folder_router,
    free_port,
    make_series,
    port_accepts,
    wait_for,
)
from prom_support import PROMETHEUS, PrometheusServer, scrape, value
from structlog.testing import capture_logs

pytestmark = pytest.mark.peer


def router_with_exporter(tmp_path: Path, address: str) -> AbstractContextManager[RunningRouter]:
    plugins = {"metrics_sinks": {"prometheus": {"address": address}}}
    return folder_router(tmp_path, plugins=plugins, metrics_interval=0.5)


def test_a_scrape_after_a_routed_series_shows_received_routed_and_delivered(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with router_with_exporter(tmp_path, str(port)) as running:  # a port alone: loopback
        dcmtk_storescu(make_series(tmp_path / "series", 20, rows=8, columns=8), running.port)
        wait_for(lambda: running.jobs("success") == 1, timeout=60, what="the job done")

        def counts() -> tuple[float | None, ...]:
            m = scrape(url)
            return (
                value(m, "mercure_incoming_files_total", service="router"),
                value(m, "mercure_incoming_series_total", service="router"),
                value(m, "mercure_jobs_created_total", action="route"),
                value(m, "mercure_dispatch_instances_total", target="folder"),
                value(m, "mercure_jobs_completed_total", target="folder"),
                value(m, "mercure_dispatch_duration_seconds_count", target="folder"),
                value(m, "mercure_jobs_success", service="spool"),
            )

        wait_for(lambda: counts() == (20, 1, 1, 20, 1, 1, 1), timeout=30,
                 what="received 20, routed 1, delivered 20 in the scrape")  # fmt: skip
        families = scrape(url)
        assert families["mercure_incoming_files"].type == "counter"
        assert families["mercure_dispatch_duration_seconds"].type == "histogram"
        assert families["mercure_spool_free_bytes"].type == "gauge"
        assert value(families, "mercure_events_boot_total", service="dispatcher") == 1
        assert value(families, "mercure_incoming_files_total", appliance="master") == 20
        assert value(families, "process_resident_memory_bytes") is not None
    assert not port_accepts(port)  # close() stopped the server


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_endpoint(tmp_path: Path) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.skip("Prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    server = PrometheusServer(tmp_path / "prometheus", f"127.0.0.1:{port}")
    (tmp_path / "prometheus").mkdir()
    with router_with_exporter(tmp_path, f"127.0.0.1:{port}") as running:
        server.start()
        try:
            dcmtk_storescu(make_series(tmp_path / "series", 20, rows=8, columns=8), running.port)
            wait_for(lambda: running.jobs("success") == 1, timeout=60, what="the job done")

            def delivered() -> float | None:
                found = server.query('mercure_dispatch_instances_total{target="folder"}')
                return float(found[0]["value"][1]) if found else None

            wait_for(lambda: delivered() == 20, timeout=60, what="Prometheus has 20 delivered")
            (up,) = server.query('up{job="mercure"}')
            assert up["value"][1] == "1"
            (files,) = server.query("mercure_incoming_files_total")
            assert files["metric"]["instance"] == f"127.0.0.1:{port}"
            assert files["value"][1] == "20"
            quantile = server.query(
                "histogram_quantile(0.5, mercure_dispatch_duration_seconds_bucket)"
            )
            assert quantile and float(quantile[0]["value"][1]) > 0
        finally:
            server.stop()


@pytest.mark.slow
def test_an_address_in_use_costs_only_the_metrics(tmp_path: Path) -> None:
    """The exporter cannot listen: the router starts anyway, says why, and delivers a
    200-instance series."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with capture_logs() as logs, router_with_exporter(tmp_path, address) as running:
            dcmtk_storescu(make_series(tmp_path / "series", 200, rows=8, columns=8), running.port)
            wait_for(lambda: running.jobs("success") == 1, timeout=120, what="the job done")
            assert len(list((tmp_path / "target").rglob("*.dcm"))) == 200
            assert "prometheus" not in running.supervisor.runtime.metrics_hub.stats()
        (error,) = [e for e in logs if e["event"].startswith("metrics sink did not start")]
        assert error["sink"] == "prometheus"
        assert f"cannot serve Prometheus metrics on {address}" in error["error"]
