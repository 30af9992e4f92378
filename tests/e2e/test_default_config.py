"""The built-in default configuration, as a user starts it: one command, real processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import (
    DCMTK_ECHOSCU,
    DCMTK_STORESCU,
    ProcessFactory,
    dcmtk_env,
    target_instances,
    visible_entries,
    wait_deadline,
    wait_until,
)
from mercure.config import default_config_data
from mercure.testing import dataset_bytes, free_port, make_series

pytestmark = [pytest.mark.peer]

INSTANCES = 20


@pytest.mark.slow
def test_default_config_delivers_a_ct_series_to_the_folder_target(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    data = tmp_path / "data"
    trigger = default_config_data(data)["series_complete_trigger"]
    port = free_port()
    series = make_series(tmp_path / "series", INSTANCES, rows=512, columns=512)
    sent = {p.name: dataset_bytes(p) for p in series}

    router = mercure_processes.start("mercure", "run", "--data", str(data), "--port", str(port))

    echo = subprocess.run(
        [str(DCMTK_ECHOSCU), "-aec", "MERCURE", "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr.decode()

    send = subprocess.run(
        [str(DCMTK_STORESCU), "-aec", "MERCURE", "127.0.0.1", str(port), *map(str, series)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    sent_at = time.monotonic()
    assert send.returncode == 0, send.stderr.decode()

    target = data / "target"

    def delivered() -> dict[str, list[str]] | None:
        found = target_instances(target)
        return found if set(sent) <= set(found) else None

    try:
        found = wait_deadline(
            delivered,
            sent_at + trigger + 3,
            f"all {INSTANCES} instances in {target}/<task id>/ "
            f"(series_complete_trigger {trigger} s + 3 s after the send)",
        )
    except AssertionError:
        print(router.output())
        raise
    assert set(found) == set(sent)
    task_ids = {task for tasks in found.values() for task in tasks}
    assert len(task_ids) == 1, f"one series must make one job, got {task_ids}"
    (task_id,) = task_ids
    for name, payload in sent.items():
        assert found[name] == [task_id]
        assert dataset_bytes(target / task_id / name) == payload, f"{name} differs from sent"

    # The job itself ends in success/ and nothing is left on the way.
    wait_until(lambda: (data / "success" / task_id).is_dir(), 30, f"job {task_id} in success/")
    assert visible_entries(data / "outgoing") == []
    assert visible_entries(data / "error") == []
    assert visible_entries(data / "incoming") == []

    assert router.terminate() == 0, router.output()
    events = router.events()
    assert any(e.get("event") == "services stopped" for e in events), router.output()
    assert not [e for e in events if e.get("level") in ("error", "critical")], router.output()
