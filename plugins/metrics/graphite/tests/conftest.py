"""Fixtures of the Graphite sink's tests: carbon on free loopback ports, stopped by its PID.

* ``carbon``: one carbon-cache for the whole session.
* ``own_carbon``: a carbon-cache of the test's own, for tests that stop and start it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from graphite_support import CARBON_CACHE, Carbon


def _skip_without_carbon() -> None:
    if not Path(CARBON_CACHE).exists():
        pytest.skip("Graphite's carbon is not installed (apt-get install graphite-carbon)")


@pytest.fixture(scope="session")
def carbon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Carbon]:
    _skip_without_carbon()
    server = Carbon(tmp_path_factory.mktemp("carbon")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_carbon(tmp_path: Path) -> Iterator[Carbon]:
    _skip_without_carbon()
    server = Carbon(tmp_path / "carbon").start()
    try:
        yield server
    finally:
        server.stop()
