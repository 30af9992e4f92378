"""The v2 write API against :class:`InfluxV2Server` (a test server: InfluxDB 2.x does not
install here), and what happens while InfluxDB is down."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from influx_support import InfluxV2Server, Point, make_sink
from mercure.metrics import Metric
from mercure.metrics_hub import MetricsHub
from mercure.testing import dcmtk_storescu, folder_router, free_port, make_series, wait_for
from mercure_metrics_influxdb import InfluxDBWriteError
from structlog.testing import capture_logs


def v2(server: InfluxV2Server, **extra: Any) -> dict[str, Any]:
    return {
        "host": server.url,
        "token": server.token,
        "org": server.org,
        "bucket": server.bucket,
        **extra,
    }


def batch(n: int, start: int = 0) -> list[Metric]:
    return [Metric("incoming.files", i, {"n": str(i)}, 1700000000 + i) for i in range(start, n)]


def test_batches_are_gzipped_line_protocol_over_one_kept_alive_connection(
    influx2: InfluxV2Server,
) -> None:
    sink = make_sink(**v2(influx2))
    sink.start()
    try:
        for first in range(0, 2000, 500):
            sink.send(batch(first + 500, first))
    finally:
        sink.close()
    assert len(influx2.writes) == 4  # one request per batch, never one per point
    assert all(w.gzip and w.precision == "ms" for w in influx2.writes)
    assert len(influx2.connections) == 1  # one client, its connection kept alive
    points = influx2.points
    assert len(points) == 2000
    assert {p.measurement for p in points} == {"mercure.master.router.incoming.files"}
    assert points[7].fields == {"value": 7} and points[7].tags == {"n": "7"}
    assert points[7].timestamp == 1700000007000


def test_without_gzip_the_body_is_plain(influx2: InfluxV2Server) -> None:
    sink = make_sink(**v2(influx2, gzip=False))
    sink.start()
    try:
        sink.send(batch(3))
    finally:
        sink.close()
    assert [w.gzip for w in influx2.writes] == [False]
    assert len(influx2.points) == 3


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"token": "wrong"}, 401, "unauthorized access; check the token (influxdb_token)"),
        ({"org": "elsewhere"}, 404, 'organization name "elsewhere" not found; check org'),
        ({"bucket": "other"}, 404, 'bucket "other" not found'),
    ],
)
def test_refused_writes_raise_with_influxdbs_answer_and_a_hint(
    influx2: InfluxV2Server, change: dict[str, str], status: int, words: str
) -> None:
    sink = make_sink(**v2(influx2, **change))
    sink.start()
    try:
        with pytest.raises(InfluxDBWriteError) as info:
            sink.send(batch(2))
    finally:
        sink.close()
    assert f"InfluxDB answered {status} to 2 points" in str(info.value)
    assert words in str(info.value)
    assert "wrong" not in str(info.value)  # never the token
    assert influx2.refused == [status] and influx2.writes == []


def test_a_slow_server_costs_one_timeout_and_a_down_one_a_refused_connection(
    influx2: InfluxV2Server,
) -> None:
    influx2.delay = 2.0
    sink = make_sink(**v2(influx2, timeout=0.3))
    sink.start()
    try:
        with pytest.raises(InfluxDBWriteError, match=r"did not answer within 0.3 s.*2 points lost"):
            sink.send(batch(2))
        influx2.delay = 0
        influx2.stop()
        with pytest.raises(
            InfluxDBWriteError, match=r"cannot reach InfluxDB at http://127\.0\.0\.1"
        ):
            sink.send(batch(2))
        # The server comes back on its port: the same sink writes again.
        InfluxV2Server(port=influx2.port, writes=influx2.writes).start()
        sink.send(batch(3))
    finally:
        sink.close()
    assert [len(w.points) for w in influx2.writes][-1] == 3


def test_an_unreadable_ca_bundle_fails_the_start_with_its_path(tmp_path: Path) -> None:
    bundle = tmp_path / "missing-ca.pem"
    sink = make_sink(host="https://127.0.0.1:1", token="t", org="o", bucket="b",
                     ca_bundle=str(bundle))  # fmt: skip
    with pytest.raises(InfluxDBWriteError, match=f"cannot use ca_bundle {bundle}"):
        sink.start()
    sink.close()


def test_https_with_a_private_ca_in_ca_bundle(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    server = InfluxV2Server(tls=context).start()
    try:
        trusted = make_sink(**v2(server, ca_bundle=str(bundle)))
        untrusted = make_sink(**v2(server))
        for sink in (trusted, untrusted):
            sink.start()
        try:
            trusted.send(batch(2))
            with pytest.raises(InfluxDBWriteError, match="CERTIFICATE_VERIFY_FAILED"):
                untrusted.send(batch(2))
        finally:
            trusted.close()
            untrusted.close()
        assert server.url.startswith("https://") and len(server.points) == 2
    finally:
        server.stop()


def test_send_before_start_or_after_close_raises() -> None:
    sink = make_sink(host="http://127.0.0.1:1", token="t", org="o", bucket="b")
    with pytest.raises(InfluxDBWriteError, match="was not started"):
        sink.send(batch(1))
    sink.start()
    sink.close()
    with pytest.raises(InfluxDBWriteError, match=r"was not started|is closed"):
        sink.send(batch(1))


@pytest.mark.peer
@pytest.mark.slow
def test_influxdb_down_a_200_instance_series_is_delivered_and_the_losses_are_counted(
    tmp_path: Path,
) -> None:
    """InfluxDB down for the whole run: delivery goes on, the dropped metrics are counted and
    the hub logs the failure with the sink's reason; when it comes back, metrics arrive."""
    port = free_port()  # nothing listens here until the server is started below
    settings = {"host": f"http://127.0.0.1:{port}", "token": "t0ken", "org": "radiology",
                "bucket": "mercure", "connect_timeout": 0.5}  # fmt: skip
    plugins = {"metrics_sinks": {"influxdb": settings}}
    with (
        capture_logs() as logs,
        folder_router(tmp_path, plugins=plugins, metrics_interval=0.5) as running,
    ):
        dcmtk_storescu(make_series(tmp_path / "a", 200, rows=8, columns=8), running.port)
        wait_for(lambda: running.jobs("success") == 1, timeout=120, what="the job done")
        assert len(list((tmp_path / "target").rglob("*.dcm"))) == 200
        hub = running.supervisor.runtime.metrics_hub
        settle(hub, "influxdb")  # every metric of the first series was tried (and lost)
        stats = hub.stats()["influxdb"]
        assert stats.dropped_failed > 0 and stats.sent == 0
        assert "cannot reach InfluxDB" in stats.last_error
        warnings = [e for e in logs if e["event"].startswith("metrics sink failed")]
        assert warnings and warnings[0]["sink"] == "influxdb"
        assert "cannot reach InfluxDB" in warnings[0]["error"]

        server = InfluxV2Server(port=port).start()
        try:
            dcmtk_storescu(make_series(tmp_path / "b", 5, rows=8, columns=8), running.port)
            wait_for(lambda: running.jobs("success") == 2, timeout=60, what="the second job")

            def files() -> list[Point]:
                name = "mercure.master.router.incoming.files"
                return [p for p in server.points if p.measurement == name]

            wait_for(files, timeout=30, what="metrics after InfluxDB came back")
            assert [p.fields["value"] for p in files()] == [5]  # the second series only
            assert hub.stats()["influxdb"].sent > 0
        finally:
            server.stop()


def settle(hub: MetricsHub, name: str) -> None:
    """Wait until the sink has tried two more batches: all recorded before has been tried."""

    def attempts() -> int:
        stats = hub.stats()[name]
        return stats.sent + stats.dropped_failed

    start = attempts()
    wait_for(lambda: attempts() > start, timeout=30, what="a send attempt")
    second = attempts()
    wait_for(lambda: attempts() > second, timeout=30, what="a second send attempt")
