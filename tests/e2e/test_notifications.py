"""Notifications survive a router killed with SIGKILL: each queued one is delivered after restart.

The router runs as a ``mercure run`` subprocess; instances come from DCMTK's storescu. The
notifier is a site plugin (``site_plugins/e2e_journal_notifier.py``) that is down while a flag
file exists, so the notifications wait in the durable outbox when the router is killed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_support import (
    DCMTK_STORESCU,
    SITE_PLUGINS,
    ProcessFactory,
    dcmtk_env,
    folder_of,
    spool_config,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import make_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_router_killed_with_notifications_in_the_outbox(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    journal, down = tmp_path / "journal.jsonl", tmp_path / "notifier-down"
    down.touch()
    target = tmp_path / "target"
    target.mkdir()
    config = spool_config(
        tmp_path,
        plugin_folder=str(SITE_PLUGINS),
        notification_retry_delay=0.5,
        notification_retries=1000,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        plugins={"notifiers": {"e2e_journal": {"journal": str(journal), "down_flag": str(down)}}},
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    outbox = folder_of(config, "outgoing").parent / "outbox"
    series = make_series(tmp_path / "series", 5)

    router = mercure_processes.start("router", "run", "--config", str(config_path))
    sent = subprocess.run(
        [str(DCMTK_STORESCU), "-aec", "MERCURE", "127.0.0.1", str(config["port"]),
         *map(str, series)],
        env=dcmtk_env(), capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr.decode()
    success = folder_of(config, "success")
    wait_until(lambda: visible_entries(success), 60, "the job in success/")

    def pending() -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in (outbox / "pending").glob("*.json")]

    # Reception and completion wait in the outbox, tried at least once, when the router dies.
    wait_until(lambda: len(pending()) == 2 and all(e["tries"] for e in pending()), 60, "retries")
    queued = {e["notification"]["id"]: e["notification"]["event"] for e in pending()}
    router.kill()
    assert not journal.exists()

    down.unlink()
    router = mercure_processes.start("router-again", "run", "--config", str(config_path))
    wait_until(lambda: not pending() and journal.exists(), 60, "the outbox to drain")
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {line["id"]: line["event"] for line in lines} == queued
    assert sorted(queued.values()) == ["completion", "reception"]
    (job,) = visible_entries(success)
    records = [json.loads(p.read_text()) for p in (outbox / "done" / job.name).glob("*.json")]
    assert sorted(r["outcome"] for r in records) == ["delivered", "delivered"]
    assert all(r["tries"] >= 2 for r in records)
    assert router.terminate() == 0
