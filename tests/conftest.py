"""Cross-package end-to-end tests: skipped, not failed, on a machine without DCMTK.

The peer tests under ``tests/`` send with DCMTK's ``storescu``/``echoscu`` (called by their
full path, since pynetdicom's console scripts of the same names shadow them). On a fresh
machine without DCMTK, ``python3 dev.py test`` must still pass, so they are skipped with the
command that enables them; ``.ci/run`` installs DCMTK, so CI runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DCMTK_TOOLS = (Path("/usr/bin/storescu"), Path("/usr/bin/echoscu"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [str(tool) for tool in DCMTK_TOOLS if not tool.exists()]
    if not missing:
        return
    skip = pytest.mark.skip(
        reason=f"DCMTK is not installed ({', '.join(missing)} missing): sudo apt-get install dcmtk"
    )
    for item in items:
        if item.get_closest_marker("peer") and item.path.resolve().is_relative_to(HERE):
            item.add_marker(skip)
