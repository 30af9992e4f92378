"""Every notifier down at once: the images still go through, the failures are counted and logged.

A router with the webhook and the e-mail notifier installed (both plugins), both pointed at
ports where nothing listens, receives a 200-instance series over DICOM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mercure.events import TaskEventType
from mercure.plugins import build_plugin_manager
from mercure.testing import (
    EventRecorder,
    config_for,
    free_port,
    make_series,
    start_router,
    store_instances,
    wait_for,
    wait_for_notifications,
)
from structlog.testing import capture_logs

pytest.importorskip("mercure_notifier_webhook", reason="mercure-notifier-webhook not installed")
pytest.importorskip("mercure_notifier_email", reason="mercure-notifier-email not installed")

FAILURES = "mercure.master.notifier.notifications.failures"


@pytest.mark.slow
def test_all_notifiers_down_a_200_instance_series_is_delivered(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    rule = {
        "rule": "True",
        "target": "folder",
        "notification_webhook": f"http://127.0.0.1:{free_port()}/hook",
        "notification_payload": '"event": "{{ event }}"',
        "notification_email": "ops@example.org, it@example.org",
    }
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": rule},
        notification_retries=2,
        notification_retry_delay=0.05,
        metrics_interval=3600,
        dicom_receiver={"bind_address": "127.0.0.1"},
        plugins={
            "notifiers": {"email": {"smtp_host": "127.0.0.1", "smtp_port": free_port()}},
            "metrics_sinks": {"log": {}},
        },
    )
    recorder = EventRecorder()
    manager = build_plugin_manager()
    manager.register(recorder, "event-recorder")
    with capture_logs() as logs:
        router_run = start_router(config, manager)
        router = next(router_run)
        try:
            store_instances(make_series(tmp_path / "s", 200, rows=8, columns=8), router.port)
            wait_for(
                lambda: sum(1 for _ in target.glob("*/*.dcm")) == 200,
                timeout=120,
                what="200 instances in the target",
            )
            # reception and completion, each for the webhook and the e-mail notifier
            records = wait_for_notifications(config, 4, timeout=60)
            given_up = recorder.wait(TaskEventType.NOTIFICATION_GIVEN_UP, count=4)

            def counted() -> dict[str, float]:
                found: dict[str, float] = {}
                for e in list(logs):
                    if e.get("metric") == FAILURES:
                        found[e["notifier"]] = found.get(e["notifier"], 0) + e["value"]
                return found

            wait_for(lambda: counted() == {"webhook": 4, "email": 4}, timeout=30, what="counts")
        finally:
            router_run.close()
    [completed] = recorder.events(TaskEventType.COMPLETED)
    assert completed.file_count == 200
    assert sorted(e.target for e in given_up) == ["email", "email", "webhook", "webhook"]
    assert all(r["outcome"] == "given up" and r["tries"] == 2 for r in records)
    warned = [e for e in list(logs) if e["event"] == "notification failed; will retry"]
    assert sorted(e["notifier"] for e in warned) == ["email", "email", "webhook", "webhook"]
