"""Fixtures of the InfluxDB sink's tests: the peers, started on free loopback ports.

* ``influxd``: Debian's InfluxDB 1.x, once per session, with its own configuration and folders
  and authentication on (an admin user made at start).
* ``influx2``: the v2 write API test server (:class:`influx_support.InfluxV2Server`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mercure.testing import PeerProcess, free_port

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from influx_support import ADMIN, INFLUXD, Influxd, InfluxV2Server, influxd_config


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd]:
    """Debian's InfluxDB 1.x on free loopback ports, authentication on, for the whole session."""
    if not Path(INFLUXD).exists():
        pytest.skip("InfluxDB 1.x is not installed (apt-get install influxdb)")
    root = tmp_path_factory.mktemp("influxd")
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        return httpx.get(f"{url}/ping", timeout=1).status_code == 204

    process = PeerProcess(
        "influxd",
        [INFLUXD, "run", "-config", str(influxd_config(root, http_port, free_port()))],
        ready,
        root / "influxd.log",
    ).start()
    try:
        # With authentication on and no user yet, InfluxDB accepts exactly this first statement.
        httpx.post(
            f"{url}/query",
            params={"q": f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES"},
            timeout=10,
        ).raise_for_status()
        yield Influxd(url, process)
    finally:
        process.stop()


@pytest.fixture
def influx2() -> Iterator[InfluxV2Server]:
    server = InfluxV2Server().start()
    try:
        yield server
    finally:
        server.stop()
