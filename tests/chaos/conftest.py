"""The fault-injection tests import their scenarios from ``chaos_support`` in this folder."""

from __future__ import annotations

import sys
from pathlib import Path

# pytest runs with --import-mode=importlib: make this folder's helper module importable.
sys.path.insert(0, str(Path(__file__).parent))
