"""The Graphite sink against a real carbon (Debian's ``graphite-carbon``): whisper files of
mercure's metric names appear, and metrics flow again after carbon was restarted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from graphite_support import Carbon, make_sink
from mercure.metrics import Metric
from mercure.metrics_hub import MetricsHub
from mercure.testing import dcmtk_storescu, folder_router, make_series, wait_for
from mercure_metrics_graphite import GraphiteSendError
from structlog.testing import capture_logs

pytestmark = pytest.mark.peer


def test_whisper_files_of_mercures_names_hold_the_values(carbon: Carbon) -> None:
    now = time.time()
    sink = make_sink(appliance="direct", host="127.0.0.1", port=carbon.port)
    tagged = make_sink(appliance="direct", host="127.0.0.1", port=carbon.port, tag_style="tagged")
    sink.start()
    tagged.start()
    try:
        sink.send(
            [
                Metric("incoming.files", 12, {}, now),
                Metric("incoming.files", 8, {}, now),  # the same second: 20 in all
                Metric("incoming.series", 1, {}, now),
                Metric("spool.free_percent", 42.5, {}, now, "gauge", "spool"),
                Metric("dispatch.instances", 20, {"target": "pacs"}, now, service="dispatcher"),
            ]
        )
        tagged.send(
            [Metric("dispatch.instances", 9, {"target": "pacs"}, now, service="dispatcher")]
        )
    finally:
        sink.close()
        tagged.close()
    second = int(now)
    wanted = {
        "mercure.direct.router.incoming.files": 20,
        "mercure.direct.router.incoming.series": 1,
        "mercure.direct.spool.spool.free_percent": 42.5,
        "mercure.direct.dispatcher.dispatch.instances.target.pacs": 20,
        "mercure.direct.dispatcher.dispatch.instances;target=pacs": 9,
    }
    for path, value in wanted.items():
        got = wait_for(lambda p=path: carbon.values(p).get(second), timeout=20, what=path)
        assert got == value, path
    assert carbon.file_of("mercure.direct.router.incoming.files").is_file()


def test_after_carbon_restarts_the_next_batch_reconnects_and_arrives(own_carbon: Carbon) -> None:
    sink = make_sink(host="127.0.0.1", port=own_carbon.port, connect_timeout=0.5)
    sink.start()
    try:
        sink.send([Metric("events.run", 1, {}, time.time())])
        own_carbon.stop()
        # carbon closed the connection when it stopped: the sink notices before writing,
        # tries to reconnect, is refused, and says so (the hub drops and counts the batch).
        with pytest.raises(GraphiteSendError, match=r"cannot connect to carbon at 127\.0\.0\.1"):
            sink.send([Metric("events.run", 1, {}, time.time())])
        with pytest.raises(GraphiteSendError, match="Connection refused"):
            sink.send([Metric("events.run", 1, {}, time.time())])
        own_carbon.start()
        after = time.time()
        sink.send([Metric("events.run", 5, {}, after)])  # the first batch after the restart
    finally:
        sink.close()
    assert sink.connects == 2
    path = "mercure.master.router.events.run"
    wait_for(lambda: carbon_has(own_carbon, path, int(after), 5), timeout=20, what="the value")


def carbon_has(carbon: Carbon, path: str, second: int, value: float) -> bool:
    return carbon.values(path).get(second) == value


def settle(hub: MetricsHub, name: str) -> None:
    """Wait until the sink has tried two more batches: all recorded before has been tried."""

    def attempts() -> int:
        stats = hub.stats()[name]
        return stats.sent + stats.dropped_failed

    for _ in range(2):
        start = attempts()
        wait_for(lambda s=start: attempts() > s, timeout=30, what="a send attempt")


@pytest.mark.slow
def test_a_routed_series_stopped_carbon_and_carbon_back(tmp_path: Path, own_carbon: Carbon) -> None:
    """Metrics of a routed series reach carbon; with carbon stopped a 200-instance series is
    delivered all the same (its metrics are dropped, counted and logged); once carbon is back,
    the next series' metrics arrive over a new connection."""
    settings = {"host": "127.0.0.1", "port": own_carbon.port, "connect_timeout": 0.5}
    plugins = {"metrics_sinks": {"graphite": settings}}
    files = "mercure.master.router.incoming.files"
    with (
        capture_logs() as logs,
        folder_router(tmp_path, plugins=plugins, metrics_interval=0.5) as running,
    ):
        hub = running.supervisor.runtime.metrics_hub
        dcmtk_storescu(make_series(tmp_path / "a", 10, rows=8, columns=8), running.port)
        wait_for(lambda: own_carbon.total(files) == 10, timeout=60, what="incoming.files 10")
        names = {
            "mercure.master.router.incoming.series",
            "mercure.master.router.events.boot",
            "mercure.master.dispatcher.events.boot",
            "mercure.master.router.jobs.created.action.route",
            "mercure.master.dispatcher.dispatch.instances.target.folder",
            "mercure.master.dispatcher.jobs.completed.target.folder",
            "mercure.master.spool.jobs.success",
        }
        wait_for(lambda: names <= own_carbon.paths(), timeout=30, what=f"whisper files {names}")
        assert own_carbon.total("mercure.master.dispatcher.dispatch.instances.target.folder") == 10
        assert hub.stats()["graphite"].dropped == 0

        own_carbon.stop()
        down_since = time.time()
        dcmtk_storescu(make_series(tmp_path / "b", 200, rows=8, columns=8), running.port)
        wait_for(lambda: running.jobs("success") == 2, timeout=120, what="the 200-instance job")
        assert len(list((tmp_path / "target").rglob("*.dcm"))) == 210
        settle(hub, "graphite")
        stats = hub.stats()["graphite"]
        assert stats.dropped_failed > 0
        assert "carbon at 127.0.0.1" in stats.last_error
        warnings = [e for e in logs if e["event"].startswith("metrics sink failed")]
        assert warnings and warnings[0]["sink"] == "graphite"

        own_carbon.start()
        back = time.time()
        dcmtk_storescu(make_series(tmp_path / "c", 7, rows=8, columns=8), running.port)
        wait_for(lambda: running.jobs("success") == 3, timeout=60, what="the third job")
        wait_for(lambda: own_carbon.total(files, since=back) == 7, timeout=30,
                 what="incoming.files of the series after the restart")  # fmt: skip
        # What was sent while carbon was down is lost (and was counted), nothing else.
        assert own_carbon.total(files, since=down_since) == 7
        assert own_carbon.total(files) == 17
