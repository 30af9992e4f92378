"""Fixtures of the dashboard's tests (helpers in dashboard_env.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_env import env  # noqa: F401 - the module-scoped router with the dashboard
