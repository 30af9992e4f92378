"""Several receiver processes share the DICOM port and all write into one spool."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
from mercure.testing import config_for, dcmtk_storescu, make_series, start_router, wait_for

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_receiver_processes_share_the_port_and_deliver_everything(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        dicom_receiver={"processes": 3},
    )
    series = [make_series(tmp_path / f"series{i}", 8) for i in range(4)]
    gen = start_router(config)
    router = next(gen)
    try:
        pool = router.supervisor.pool
        assert pool is not None and len(pool.processes) == 2
        assert all(p.poll() is None for p in pool.processes)

        def send(files: list[Path]) -> None:
            dcmtk_storescu(files, router.port)

        senders = [threading.Thread(target=send, args=(files,)) for files in series]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)

        # Without the main process's receiver, the workers alone still serve the port.
        router.supervisor.receivers[0].stop()
        late = make_series(tmp_path / "late", 3)
        result = dcmtk_storescu(late, router.port, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")

        expected = {p.name for files in [*series, late] for p in files}
        wait_for(
            lambda: {p.name for p in target.rglob("*.dcm")} >= expected,
            timeout=30,
            what="every instance at the folder target",
        )
        assert len(list(target.iterdir())) == 5  # one job per series
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
    assert router.supervisor.pool is None or not router.supervisor.pool.processes
