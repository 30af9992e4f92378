"""The ``influxdb`` metrics sink: each batch is one gzipped line-protocol POST.

One :class:`httpx.Client` per sink instance, made in :meth:`InfluxDBSink.start` and closed in
:meth:`InfluxDBSink.close`, holds one kept-alive connection (mercure made a client per point).
:meth:`InfluxDBSink.send` runs on the sink's own thread (the core's metrics hub); a refused
connection, a timeout or an answer other than 2xx raises :class:`InfluxDBWriteError`, and the
hub drops and counts that batch: metrics never make the pipeline wait.
"""

from __future__ import annotations

import gzip
import json
import ssl
import threading
from typing import Any

import httpx
from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink

from mercure_metrics_influxdb.line_protocol import UnwritableMetric, encode
from mercure_metrics_influxdb.settings import InfluxDBSettings

log = get_logger("mercure.metrics.influxdb")


class InfluxDBWriteError(RuntimeError):
    """A batch was not written; the message says what InfluxDB (or the network) answered."""


class InfluxDBSink(MetricsSink[InfluxDBSettings]):
    """Writes batches of metrics to InfluxDB over HTTP."""

    def __init__(self, name: str, settings: InfluxDBSettings, context: PluginContext) -> None:
        super().__init__(name, settings, context)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._skipped: set[str] = set()

    def start(self) -> None:
        s = self.settings
        headers = {"Content-Type": "text/plain; charset=utf-8", "Accept": "application/json"}
        auth: tuple[str, str] | None = None
        if s.api == "v1" and s.username:
            auth = (s.username, s.password or "")
        elif s.token:
            headers["Authorization"] = f"Token {s.token}"
        verify: ssl.SSLContext | bool = s.verify_tls
        if s.ca_bundle and s.verify_tls:
            try:
                verify = ssl.create_default_context(cafile=s.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise InfluxDBWriteError(
                    f"cannot use ca_bundle {s.ca_bundle} of InfluxDB sink '{self.name}': {exc}"
                ) from exc
        self._client = httpx.Client(
            base_url=s.host,
            headers=headers,
            auth=auth,
            verify=verify,
            timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout),
            # Batches come one at a time from one thread: one connection, kept alive.
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        log.info("writing metrics to InfluxDB", sink=self.name, url=self.write_url)

    @property
    def write_url(self) -> str:
        """Where batches go, without credentials (for logs and errors)."""
        path, params = self._target()
        return str(httpx.URL(self.settings.host + path, params=params))

    def _target(self) -> tuple[str, dict[str, str]]:
        s = self.settings
        if s.api == "v2":
            return "/api/v2/write", {"org": s.org, "bucket": s.bucket, "precision": "ms"}
        params = {"db": s.database, "precision": "ms"}
        if s.retention_policy:
            params["rp"] = s.retention_policy
        return "/write", params

    def lines(self, metrics: list[Metric]) -> list[str]:
        """The batch in line protocol; metrics InfluxDB cannot store are left out (logged once)."""
        found = []
        for metric in metrics:
            try:
                found.append(
                    encode(metric, self.context.appliance_name, self.settings.prefix,
                           self.settings.tags)
                )  # fmt: skip
            except UnwritableMetric as exc:
                if metric.name not in self._skipped:
                    self._skipped.add(metric.name)
                    log.warning("metric not written to InfluxDB", sink=self.name, reason=str(exc))
        return found

    def send(self, metrics: list[Metric]) -> None:
        if self._client is None:
            raise InfluxDBWriteError(f"InfluxDB sink '{self.name}' was not started")
        lines = self.lines(metrics)
        if not lines:
            return
        body = ("\n".join(lines) + "\n").encode("utf-8")
        headers = {}
        if self.settings.gzip:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        path, params = self._target()
        with self._lock:
            client = self._client
            if client is None:
                raise InfluxDBWriteError(f"InfluxDB sink '{self.name}' is closed")
            try:
                response = client.post(path, params=params, content=body, headers=headers)
            except httpx.TimeoutException as exc:
                raise InfluxDBWriteError(
                    f"InfluxDB at {self.write_url} did not answer within "
                    f"{self.settings.timeout} s ({exc.__class__.__name__}); "
                    f"{len(lines)} points lost"
                ) from exc
            except httpx.HTTPError as exc:
                raise InfluxDBWriteError(
                    f"cannot reach InfluxDB at {self.write_url}: {exc}; {len(lines)} points lost"
                ) from exc
        if response.is_success:
            return
        raise InfluxDBWriteError(
            f"InfluxDB answered {response.status_code} to {len(lines)} points for "
            f"{self.write_url}: {_reason(response)}{_hint(response.status_code, self.settings)}"
        )

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _reason(response: httpx.Response) -> str:
    """InfluxDB's own words: ``{"error": ...}`` (1.x) or ``{"code", "message"}`` (2.x)."""
    text = response.text.strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        return text[:300] or response.reason_phrase
    if isinstance(data, dict):
        for key in ("message", "error"):
            if data.get(key):
                return str(data[key])[:300]
    return text[:300]


def _hint(status: int, s: InfluxDBSettings) -> str:
    if status in (401, 403):
        return (
            "; check the token (influxdb_token) and that it may write to the bucket"
            if s.api == "v2"
            else "; check username and password"
        )
    if status == 404:
        return (
            '; check org and bucket (influxdb_org, influxdb_bucket), or use "api": "v1" '
            "for InfluxDB 1.x"
            if s.api == "v2"
            else '; create the database or correct "database"'
        )
    return ""


__all__ = ["InfluxDBSink", "InfluxDBWriteError"]
