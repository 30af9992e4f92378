"""Every metrics sink down at once: a 200-instance series is still delivered, and the failures
are counted and logged.

``mercure run`` with mercure's own fields pointing Graphite and InfluxDB at loopback ports where
nothing listens, and a Prometheus exporter whose address is already taken. Needs the three
metrics plugins (installed in the workspace); skipped where they are not.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    DCMTK_STORESCU,
    ProcessFactory,
    dcmtk_env,
    folder_of,
    spool_config,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import free_port, make_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]

SINK_PLUGINS = (
    "mercure_metrics_graphite",
    "mercure_metrics_influxdb",
    "mercure_metrics_prometheus",
)


def test_every_metrics_sink_down_a_200_instance_series_is_delivered(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    missing = [m for m in SINK_PLUGINS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"metrics plugins not installed: {', '.join(missing)}")
    target = tmp_path / "target"
    target.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        prometheus_address = f"127.0.0.1:{taken.getsockname()[1]}"
        config: dict[str, Any] = spool_config(
            tmp_path,
            targets={"folder": {"target_type": "folder", "folder": str(target)}},
            rules={"all": {"rule": "True", "target": "folder"}},
            metrics_interval=0.5,
            graphite_ip="127.0.0.1",
            graphite_port=free_port(),
            influxdb_host=f"http://127.0.0.1:{free_port()}",
            influxdb_token="t0ken",
            influxdb_org="radiology",
            influxdb_bucket="mercure",
            plugins={"metrics_sinks": {"prometheus": {"address": prometheus_address}}},
        )
        config_path = write_config(tmp_path / "mercure.json", config)
        router = mercure_processes.start("router", "run", "--config", str(config_path))

        files = make_series(tmp_path / "series", 200, rows=8, columns=8)
        sent = subprocess.run(
            [str(DCMTK_STORESCU), "-aec", "MERCURE", "127.0.0.1", str(config["port"]),
             *map(str, files)],
            env=dcmtk_env(), capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr.decode()
        wait_until(lambda: len(visible_entries(folder_of(config, "success"))) == 1, 120,
                   "the job in success/")  # fmt: skip
        assert len(list(target.rglob("*.dcm"))) == 200

        def failures() -> dict[str, dict[str, Any]]:
            return {
                e["sink"]: e
                for e in router.events()
                if e.get("event", "").startswith("metrics sink failed")
            }

        found = wait_until(lambda: {"graphite", "influxdb"} <= failures().keys() and failures(),
                           30, "a logged failure of each sink")  # fmt: skip
        assert "cannot connect to carbon at 127.0.0.1" in found["graphite"]["error"]
        assert "cannot reach InfluxDB at http://127.0.0.1" in found["influxdb"]["error"]
        assert all(found[s]["dropped_so_far"] > 0 for s in ("graphite", "influxdb"))
        (not_started,) = [
            e for e in router.events() if e.get("event", "").startswith("metrics sink did not")
        ]
        assert not_started["sink"] == "prometheus"
        assert f"cannot serve Prometheus metrics on {prometheus_address}" in not_started["error"]
        assert router.terminate() == 0
