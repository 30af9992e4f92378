"""Fixtures and helpers of the Prometheus sink's tests (helpers in ``prom_support``)."""

from __future__ import annotations

import sys
from pathlib import Path

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))
