"""Fixtures of the end-to-end tests: mercure processes started and stopped by PID."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from e2e_support import ProcessFactory, started_processes


@pytest.fixture
def mercure_processes(tmp_path: Path) -> Iterator[ProcessFactory]:
    """Start ``mercure`` subprocesses; every one still running at the end is killed by its PID."""
    with started_processes(tmp_path) as factory:
        yield factory
