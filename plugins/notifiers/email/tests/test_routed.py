"""E-mails of real routed series: a router with a folder target, fed over DICOM, mailing.

Expected subjects and bodies are written out from mercure's rules (subject
``[Mercure] Rule <name>: <EVENT>``, legacy macros then Jinja2, no patient data unless
``phi_notifications``), not computed with the core's renderer.
"""

from __future__ import annotations

from collections.abc import Callable
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
    store_instances,
    wait_for,
    wait_for_notifications,
)
from structlog.testing import capture_logs

pytestmark = pytest.mark.peer  # talks to a real SMTP server started by the tests
StartServer = Callable[..., Any]
BODY = "<p>@rule@: {{ event }} for {{ task_id }}</p><p>{{ details }}|{{ patient_name }}</p>"


def make_config(tmp_path: Path, port: int, rules: dict[str, Any], **overrides: Any) -> Config:
    good = tmp_path / "good"
    good.mkdir(exist_ok=True)
    mail = {
        "notification_email": "ops@example.org, radiology@example.org",
        "notification_email_body": BODY,
        "notification_email_type": "html",
    }
    notifier = {"smtp_host": "127.0.0.1", "smtp_port": port, "timeout": 10}
    notifier.update(overrides.pop("email_settings", {}))
    return config_for(
        tmp_path,
        targets={
            "good": {"target_type": "folder", "folder": str(good)},
            "broken": {"target_type": "folder", "folder": str(tmp_path / "not-there")},
        },
        rules={name: {**mail, **rule} for name, rule in rules.items()},
        email_notification_from="router@example.org",
        plugins={"notifiers": {"email": notifier}, **overrides.pop("plugins", {})},
        retry_max=1,
        notification_retry_delay=0.05,
        dicom_receiver={"bind_address": "127.0.0.1"},
        **overrides,
    )


def delivered(tmp_path: Path) -> int:
    return sum(1 for p in (tmp_path / "good").glob("*/*.dcm"))


def test_reception_completion_and_error_mails_of_routed_series(
    tmp_path: Path, smtp_server: StartServer, router_for: RouterFactory
) -> None:
    server = smtp_server()
    config = make_config(
        tmp_path,
        server.port,
        {
            "ok": {"rule": "tags.SeriesDescription == 'ok'", "target": "good"},
            "bad": {"rule": "tags.SeriesDescription == 'bad'", "target": "broken"},
        },
    )
    router, events = router_for(config)
    store_instances(make_series(tmp_path / "ok", 4, series_description="ok"), router.port)
    store_instances(make_series(tmp_path / "bad", 2, series_description="bad"), router.port)
    records = wait_for_notifications(config, 4)

    assert delivered(tmp_path) == 4
    assert {(r["outcome"], r["detail"]) for r in records} == {
        ("delivered", "2 of 2 recipients accepted")
    }
    [done] = events.wait(TaskEventType.COMPLETED)
    [failed] = events.wait(TaskEventType.MOVED_TO_ERROR)
    got: dict[tuple[str, str], str] = {}
    for received in server.mailbox.messages:
        msg = received.message
        assert received.mail_from == "router@example.org"
        assert msg["From"] == "router@example.org"
        assert msg.get_content_type() == "text/html"
        got[(msg["To"], msg["Subject"])] = received.text.rstrip("\n")
    expected = {}
    for rule, event, task_id, details in [
        ("ok", "RECEIVED", done.task_id, ""),
        ("ok", "COMPLETED", done.task_id, ""),
        ("bad", "RECEIVED", failed.task_id, ""),
        ("bad", "ERROR", failed.task_id, failed.info),
    ]:
        for address in ("ops@example.org", "radiology@example.org"):
            expected[(address, f"[Mercure] Rule {rule}: {event}")] = (
                f"<p>{rule}: {event} for {task_id}</p><p>{details}|</p>"
            )
    assert got == expected
    assert len(server.mailbox.messages) == 8


def test_a_wrong_password_is_recorded_as_given_up(
    tmp_path: Path, smtp_server: StartServer, router_for: RouterFactory, certs: Any
) -> None:
    server = smtp_server(login=True, tls_context=certs.server_context, auth_require_tls=True)
    only_completion = {
        "rule": "True",
        "target": "good",
        "notification_trigger_reception": False,
        "notification_trigger_error": False,
    }
    config = make_config(
        tmp_path,
        server.port,
        {"all": only_completion},
        email_settings={
            "starttls": True,
            "ca_bundle": str(certs.ca_file),
            "username": "mercure",
            "password": "wrong",
        },
    )
    router, events = router_for(config)
    store_instances(make_series(tmp_path / "s", 3), router.port)
    [record] = wait_for_notifications(config, 1)

    assert (record["outcome"], record["tries"]) == ("given up", 1)
    assert "refused the login of mercure: 535" in record["detail"]
    [given_up] = events.wait(TaskEventType.NOTIFICATION_GIVEN_UP)
    assert given_up.target == "email" and "535" in given_up.info
    assert server.mailbox.messages == []
    assert delivered(tmp_path) == 3


@pytest.mark.slow
def test_smtp_down_a_200_instance_series_is_delivered_and_failures_counted(
    tmp_path: Path, router_for: RouterFactory
) -> None:
    config = make_config(
        tmp_path,
        free_port(),  # nothing listens there
        {"all": {"rule": "True", "target": "good"}},
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
    for record in records:
        assert record["outcome"] == "given up"
        assert record["detail"].startswith("gave up after 2 tries: cannot reach SMTP server")
    retries = [e for e in list(logs) if e["event"] == "notification failed; will retry"]
    assert len(retries) == 2 and all("cannot reach SMTP server" in e["error"] for e in retries)
