"""Notification payloads render exactly as mercure renders them (its documented examples)."""

from __future__ import annotations

import json

import pytest
from mercure.config import Rule
from mercure.payloads import render_notification, render_template

PATIENT = {"acc": "ACC42", "mrn": "MRN42", "patient_name": "Doe^Jane"}


def test_legacy_macros_then_jinja() -> None:
    text = "@rule@ / @task_id@ / @event@ / {{ rule }} {{ event }} {{ task_id }} {{ details }}"
    out = render_template(
        text, event="completion", rule_name="ct_ai", task_id="t-1", details="3 nodules"
    )
    assert out == "ct_ai / t-1 / COMPLETED / ct_ai COMPLETED t-1 3 nodules"


def test_mercures_slack_example_payload() -> None:
    """mercure's docs: a Slack webhook with the body in a "text" field."""
    rule = Rule(
        notification_webhook="https://hooks.slack.com/services/XXX",
        notification_payload='"text": "{{ body }}"',
        notification_payload_body="Rule @rule@ sent {{ event }} for task {{ task_id }}",
    )
    note = render_notification("reception", "stroke", rule, "t-9", patient=PATIENT)
    assert note.problem is None
    assert note.webhook_payload == {"text": "Rule stroke sent RECEIVED for task t-9"}


def test_body_is_escaped_to_sit_inside_a_json_string() -> None:
    rule = Rule(
        notification_webhook="http://h",
        notification_payload='"text": "{{ body }}", "event": "@event@"',
        notification_payload_body="Line \"one\"\nand <two> & 'three'",
    )
    note = render_notification("error", "r", rule, "t")
    assert note.webhook_payload == {
        "text": "Line \"one\"\nand <two> & 'three'",
        "event": "ERROR",
    }


def test_patient_data_only_with_phi_notifications() -> None:
    rule = Rule(
        notification_webhook="http://h",
        notification_payload='"who": "{{ patient_name }}", "mrn": "{{ mrn }}", "acc": "{{ acc }}"',
        notification_email="a@example.org, b@example.org",
        notification_email_body="{{ patient_name }}|{{ mrn }}|{{ acc }}",
    )
    off = render_notification("reception", "r", rule, "t", patient=PATIENT, phi=False)
    assert off.webhook_payload == {"who": "UNKNOWN", "mrn": "UNKNOWN", "acc": "UNKNOWN"}
    assert off.email_body == "||"  # mercure gives the e-mail template no patient data at all
    on = render_notification("reception", "r", rule, "t", patient=PATIENT, phi=True)
    assert on.webhook_payload == {"who": "Doe^Jane", "mrn": "MRN42", "acc": "ACC42"}
    assert on.email_body == "Doe^Jane|MRN42|ACC42"


def test_with_phi_a_tag_the_series_lacks_is_missing_as_in_mercures_task_file() -> None:
    """mercure's task file holds MISSING for an absent PatientID/AccessionNumber/PatientName."""
    rule = Rule(
        notification_webhook="http://h",
        notification_payload='"who": "{{ patient_name }}", "mrn": "{{ mrn }}", "acc": "{{ acc }}"',
        notification_email="a@example.org",
        notification_email_body="{{ patient_name }}|{{ mrn }}|{{ acc }}",
    )
    note = render_notification("error", "r", rule, "t", patient={"patient_name": ""}, phi=True)
    assert note.webhook_payload == {"who": "", "mrn": "MISSING", "acc": "MISSING"}
    assert note.email_body == "|MISSING|MISSING"  # present but empty stays empty


def test_email_recipients_subject_and_type() -> None:
    rule = Rule(
        notification_email="a@example.org, b@example.org",
        notification_email_body="<b>{{ rule }}</b>",
        notification_email_type="html",
    )
    note = render_notification("completion", "ct_route", rule, "t")
    assert note.email_to == ("a@example.org", "b@example.org")
    assert note.email_subject == "[Mercure] Rule ct_route: COMPLETED"
    assert (note.email_body, note.email_type) == ("<b>ct_route</b>", "html")
    assert note.webhook_url == "" and note.webhook_payload is None


def test_empty_payload_posts_an_empty_object() -> None:
    note = render_notification("reception", "r", Rule(notification_webhook="http://h"), "t")
    assert note.webhook_payload == {}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ('"a": 1,', "not JSON"),
        ('"a": "{{ ().__class__.__bases__ }}"', "unsafe"),
        ('"a": "{{ unclosed "', "cannot be rendered"),
    ],
)
def test_a_broken_payload_is_a_problem_not_garbage(payload: str, reason: str) -> None:
    rule = Rule(notification_webhook="http://h", notification_payload=payload)
    note = render_notification("reception", "r", rule, "t")
    assert note.webhook_problem is not None and reason in note.webhook_problem
    assert "rule 'r'" in note.webhook_problem
    assert note.email_problem is None


def test_a_broken_email_template_leaves_the_webhook_part_intact() -> None:
    rule = Rule(
        notification_webhook="http://h",
        notification_email="a@example.org",
        notification_email_body="{{ unclosed ",
    )
    note = render_notification("reception", "r", rule, "t")
    assert note.email_problem is not None and "cannot be rendered" in note.email_problem
    assert note.webhook_problem is None
    assert note.webhook_payload is not None


def test_a_notification_survives_the_outbox_round_trip() -> None:
    from mercure.notifiers import Notification

    rule = Rule(notification_webhook="http://h", notification_payload='"x": [1, 2]',
                notification_email="a@b")  # fmt: skip
    note = render_notification("error", "r", rule, "t", details="d")
    assert Notification.from_json(json.loads(note.dumps())) == note
