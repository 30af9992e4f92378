"""Webhooks of real routed series: a router with a folder target, fed over DICOM, notifying.

The expected bodies are written out from mercure's rules for its templates (legacy macros,
then Jinja2; ``body`` JSON-escaped into the payload; patient data ``UNKNOWN`` unless
``phi_notifications``), not computed with the core's renderer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mercure.config import Config
from mercure.events import TaskEventType
from mercure.testing import (
    RouterFactory,
    config_for,
    free_port,
    make_series,
    outbox_records,
    store_instances,
    wait_for,
    wait_for_notifications,
)
from pytest_httpserver import HTTPServer
from structlog.testing import capture_logs

pytestmark = pytest.mark.peer  # talks to a real HTTP server started by the tests
PAYLOAD = (
    '"rule": "@rule@", "event": "{{ event }}", "task_id": "@task_id@", "text": "{{ body }}", '
    '"patient": "{{ patient_name }}", "mrn": "{{ mrn }}"'
)
BODY = 'Rule {{ rule }} said "{{ event }}" for {{ task_id }}\n{{ details }}'


def make_config(tmp_path: Path, url: str, rules: dict[str, Any], **overrides: Any) -> Config:
    good = tmp_path / "good"
    good.mkdir(exist_ok=True)
    hook = {"notification_webhook": url, "notification_payload": PAYLOAD}
    hook["notification_payload_body"] = BODY
    return config_for(
        tmp_path,
        targets={
            "good": {"target_type": "folder", "folder": str(good)},
            "broken": {"target_type": "folder", "folder": str(tmp_path / "not-there")},
        },
        rules={name: {**hook, **rule} for name, rule in rules.items()},
        retry_max=1,
        notification_retry_delay=0.05,
        dicom_receiver={"bind_address": "127.0.0.1"},
        **overrides,
    )


def delivered(tmp_path: Path) -> int:
    return sum(1 for p in (tmp_path / "good").glob("*/*.dcm"))


def test_reception_completion_and_error_of_routed_series(
    tmp_path: Path, webhook_server: HTTPServer, router_for: RouterFactory
) -> None:
    webhook_server.expect_request("/hook", method="POST").respond_with_data("thanks")
    config = make_config(
        tmp_path,
        webhook_server.url_for("/hook"),
        {
            "ok": {"rule": "tags.SeriesDescription == 'ok'", "target": "good"},
            "bad": {"rule": "tags.SeriesDescription == 'bad'", "target": "broken"},
        },
    )
    router, events = router_for(config)
    store_instances(make_series(tmp_path / "ok", 5, series_description="ok"), router.port)
    store_instances(make_series(tmp_path / "bad", 3, series_description="bad"), router.port)
    records = wait_for_notifications(config, 4)

    assert delivered(tmp_path) == 5
    assert {r["outcome"] for r in records} == {"delivered"}
    assert {r["detail"] for r in records} == {"HTTP 200"}
    [done] = events.wait(TaskEventType.COMPLETED)
    [failed] = events.wait(TaskEventType.MOVED_TO_ERROR)
    assert (tmp_path / "spool" / "success" / done.task_id).is_dir()
    assert (tmp_path / "spool" / "error" / failed.task_id).is_dir()
    assert failed.info  # the target's reason, which the error notification carries

    bodies = [json.loads(request.get_data()) for request, _ in webhook_server.log]
    assert len(bodies) == 4
    by_key = {(b["rule"], b["event"]): b for b in bodies}

    def expected(rule: str, event: str, task_id: str, details: str = "") -> dict[str, str]:
        return {
            "rule": rule,
            "event": event,
            "task_id": task_id,
            "text": f'Rule {rule} said "{event}" for {task_id}\n{details}',
            "patient": "UNKNOWN",
            "mrn": "UNKNOWN",
        }

    assert by_key == {
        ("ok", "RECEIVED"): expected("ok", "RECEIVED", done.task_id),
        ("ok", "COMPLETED"): expected("ok", "COMPLETED", done.task_id),
        ("bad", "RECEIVED"): expected("bad", "RECEIVED", failed.task_id),
        ("bad", "ERROR"): expected("bad", "ERROR", failed.task_id, failed.info),
    }
    sent = events.wait(TaskEventType.NOTIFICATION_SENT, count=4)
    assert sorted((e.rule, e.info.split(":")[0]) for e in sent) == [
        ("bad", "error"),
        ("bad", "reception"),
        ("ok", "completion"),
        ("ok", "reception"),
    ]


def test_patient_data_only_when_the_configuration_allows_it(
    tmp_path: Path, webhook_server: HTTPServer, router_for: RouterFactory
) -> None:
    webhook_server.expect_request("/hook").respond_with_data("ok")
    only_completion = {
        "rule": "True",
        "target": "good",
        "notification_trigger_reception": False,
        "notification_trigger_error": False,
    }
    config = make_config(
        tmp_path, webhook_server.url_for("/hook"), {"all": only_completion}, phi_notifications=True
    )
    router, _ = router_for(config)
    store_instances(make_series(tmp_path / "s", 2, PatientID="MRN77"), router.port)
    wait_for_notifications(config, 1)
    [(request, _)] = webhook_server.log
    body = json.loads(request.get_data())
    assert (body["event"], body["patient"], body["mrn"]) == ("COMPLETED", "Test^Patient", "MRN77")


def only_completion(url_rules: str = "good") -> dict[str, Any]:
    return {
        "rule": "True",
        "target": url_rules,
        "notification_trigger_reception": False,
        "notification_trigger_error": False,
    }


def test_a_500_then_a_200_delivers_once(
    tmp_path: Path, webhook_server: HTTPServer, router_for: RouterFactory
) -> None:
    webhook_server.expect_ordered_request("/hook").respond_with_data("overloaded", status=500)
    webhook_server.expect_ordered_request("/hook").respond_with_data("ok", status=200)
    config = make_config(tmp_path, webhook_server.url_for("/hook"), {"all": only_completion()})
    router, events = router_for(config)
    store_instances(make_series(tmp_path / "s", 3), router.port)
    [record] = wait_for_notifications(config, 1)

    assert (record["outcome"], record["detail"], record["tries"]) == ("delivered", "HTTP 200", 2)
    assert len(record["errors"]) == 1 and "answered HTTP 500" in record["errors"][0]
    assert "overloaded" in record["errors"][0]
    assert [response.status_code for _, response in webhook_server.log] == [500, 200]
    [sent] = events.wait(TaskEventType.NOTIFICATION_SENT)
    assert sent.extra["tries"] == 2
    assert events.events(TaskEventType.NOTIFICATION_GIVEN_UP) == []
    assert delivered(tmp_path) == 3


def test_a_404_is_given_up_at_once_and_recorded(
    tmp_path: Path, webhook_server: HTTPServer, router_for: RouterFactory
) -> None:
    webhook_server.expect_request("/hook").respond_with_data("no such hook", status=404)
    config = make_config(tmp_path, webhook_server.url_for("/hook"), {"all": only_completion()})
    router, events = router_for(config)
    store_instances(make_series(tmp_path / "s", 3), router.port)
    [record] = wait_for_notifications(config, 1)

    assert (record["outcome"], record["tries"]) == ("given up", 1)
    assert "answered HTTP 404" in record["detail"] and "no such hook" in record["detail"]
    done = tmp_path / "spool" / "outbox" / "done" / record["notification"]["task_id"]
    assert [json.loads(p.read_text())["outcome"] for p in done.glob("*.json")] == ["given up"]
    [given_up] = events.wait(TaskEventType.NOTIFICATION_GIVEN_UP)
    assert given_up.target == "webhook" and given_up.rule == "all"
    assert "HTTP 404" in given_up.info and given_up.task_id == record["notification"]["task_id"]
    assert len(webhook_server.log) == 1
    assert delivered(tmp_path) == 3


@pytest.mark.slow
def test_webhook_down_a_200_instance_series_is_delivered_and_failures_counted(
    tmp_path: Path, router_for: RouterFactory
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    rule = {"rule": "True", "target": "good"}
    config = make_config(
        tmp_path,
        url,
        {"all": rule},
        notification_retries=2,
        metrics_interval=3600,
        plugins={"metrics_sinks": {"log": {}}},
    )
    with capture_logs() as logs:
        router, events = router_for(config)
        store_instances(make_series(tmp_path / "s", 200, rows=8, columns=8), router.port)
        wait_for(lambda: delivered(tmp_path) == 200, timeout=120, what="200 instances delivered")
        records = wait_for_notifications(config, 2, timeout=60)

        # Both notifications given up, each after 2 failed tries: 4 failures counted.
        assert len(events.wait(TaskEventType.NOTIFICATION_GIVEN_UP, count=2)) == 2

        def failures_counted() -> float:
            return sum(
                e["value"]
                for e in list(logs)
                if e.get("metric") == "mercure.master.notifier.notifications.failures"
            )

        wait_for(lambda: failures_counted() >= 4, timeout=30, what="4 failures counted")
        assert failures_counted() == 4
    [completed] = events.wait(TaskEventType.COMPLETED)
    assert completed.file_count == 200
    assert sorted(r["notification"]["event"] for r in records) == ["completion", "reception"]
    for record in records:
        assert record["outcome"] == "given up"
        assert record["detail"].startswith("gave up after 2 tries: cannot reach http://127.0.0")
    retries = [e for e in list(logs) if e["event"] == "notification failed; will retry"]
    assert len(retries) == 2 and all("cannot reach" in e["error"] for e in retries)
    assert len([e for e in list(logs) if e["event"] == "notification given up"]) == 2
    assert outbox_records(config) == records
