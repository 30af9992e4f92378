"""Fixtures of the dashboard's tests (helpers in dashboard_env.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_env import SCREENSHOTS, env, ledger  # noqa: F401 - the fixtures


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Name the folder the browser tests saved their screenshots in."""
    for folder in config.stash.get(SCREENSHOTS, []):
        terminalreporter.write_line(f"dashboard screenshots: {folder}")
