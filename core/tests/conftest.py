"""Fixtures shared by the core's tests (and the path that lets them import ``task_recorder``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from mercure.plugins import PluginManager

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib adds no test folders

from task_recorder import Recorder


@pytest.fixture
def recorder(plugin_manager: PluginManager, register_plugin: Any) -> Recorder:
    """A :class:`Recorder` registered on the test's plugin manager."""
    rec = Recorder()
    register_plugin(rec, "recorder")
    return rec
