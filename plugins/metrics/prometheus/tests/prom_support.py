"""Scraping for the Prometheus sink's tests: the exposition format parsed with prometheus_client's
own text parser, and a real Prometheus server (Debian's ``prometheus``) on free loopback ports."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mercure.testing import PeerProcess, free_port
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def scrape(url: str) -> dict[str, Any]:
    """``GET url`` and parse it: metric families by name."""
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    """The value of the one sample named ``sample`` whose labels include ``labels``."""
    for family in families.values():
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                return float(s.value)
    return None


@dataclass
class PrometheusServer:
    """Debian's Prometheus scraping one target every second, with its own folders."""

    root: Path
    target: str
    port: int = 0
    process: PeerProcess | None = None

    def start(self) -> PrometheusServer:
        self.port = free_port()
        config = self.root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: mercure\n    static_configs:\n"
            f"      - targets: ['{self.target}']\n"
        )
        url = f"http://127.0.0.1:{self.port}"
        self.process = PeerProcess(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200,
            self.root / "prometheus.log",
        ).start()
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant PromQL query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        response = httpx.get(
            f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=10
        )
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
