"""The XNAT stand-in for the XNAT target's tests (``xnat_server``); helpers are importable."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from xnat_test_server import XnatTestServer


@pytest.fixture
def xnat_server() -> Iterator[XnatTestServer]:
    server = XnatTestServer().start()
    yield server
    server.stop()
