"""mercure metrics sink ``influxdb``: line protocol over HTTP to InfluxDB (v2 or v1 write API).

Configured by mercure's ``influxdb_host``/``influxdb_token``/``influxdb_org``/``influxdb_bucket``
or by ``plugins.metrics_sinks.influxdb``; see the README for every setting.
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_metrics_influxdb.line_protocol import encode
from mercure_metrics_influxdb.settings import InfluxDBSettings
from mercure_metrics_influxdb.sink import InfluxDBSink, InfluxDBWriteError


@hookimpl
def register_metrics_sinks(register: RegisterFn) -> None:
    register("influxdb", InfluxDBSettings, InfluxDBSink)


__all__ = ["InfluxDBSettings", "InfluxDBSink", "InfluxDBWriteError", "encode"]
