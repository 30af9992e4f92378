"""mercure's notification rendering: what a rule's templates produce, written out by hand."""

from __future__ import annotations

from mercure.config import Rule
from mercure.payloads import render_notification

PATIENT = {"acc": "ACC42", "mrn": "MRN42", "patient_name": "Doe^Jane"}
WEBHOOK_RULE = Rule(
    rule="True",
    notification_webhook="http://127.0.0.1:9/hook",
    notification_payload=(
        '"event": "@event@", "rule": "{{ rule }}", "task": "@task_id@", "text": "{{ body }}", '
        '"acc": "{{ acc }}", "mrn": "{{ mrn }}", "name": "{{ patient_name }}", '
        '"device": "{{ DeviceSerialNumber }}"'
    ),
    notification_payload_body='Series of {{ patient_name }} "done"\nsee {{ details }}',
    notification_email="a@example.org, b@example.org",
    notification_email_body="{{ event }} {{ acc }}/{{ mrn }}/{{ patient_name }}",
    notification_email_type="html",
)


def test_without_phi_the_webhook_sees_unknown_and_the_email_nothing() -> None:
    note = render_notification(
        "completion", "ct", WEBHOOK_RULE, "t1", details="x", patient=PATIENT, phi=False
    )
    assert note.problem is None
    assert note.webhook_payload == {
        "event": "COMPLETED",
        "rule": "ct",
        "task": "t1",
        "text": 'Series of UNKNOWN "done"\nsee x',
        "acc": "UNKNOWN",
        "mrn": "UNKNOWN",
        "name": "UNKNOWN",
        "device": "None",
    }
    assert note.email_body == "COMPLETED //"
    assert note.email_to == ("a@example.org", "b@example.org")
    assert note.email_subject == "[Mercure] Rule ct: COMPLETED"
    assert note.email_type == "html"


def test_with_phi_the_patient_data_is_there() -> None:
    note = render_notification(
        "reception",
        "ct",
        WEBHOOK_RULE,
        "t2",
        patient=PATIENT,
        device_serial_number="SN7",
        phi=True,
    )
    assert note.webhook_payload["name"] == "Doe^Jane"
    assert note.webhook_payload["acc"] == "ACC42"
    assert note.webhook_payload["device"] == "SN7"
    assert note.webhook_payload["text"] == 'Series of Doe^Jane "done"\nsee '
    assert note.email_body == "RECEIVED ACC42/MRN42/Doe^Jane"


def test_with_phi_a_tag_the_series_lacks_is_missing_as_in_mercures_task_file() -> None:
    """mercure fills absent PatientID/AccessionNumber/PatientName with MISSING in task.json."""
    note = render_notification(
        "error", "ct", WEBHOOK_RULE, "t3", patient={"patient_name": ""}, phi=True
    )
    assert (note.webhook_payload["acc"], note.webhook_payload["mrn"]) == ("MISSING", "MISSING")
    assert note.webhook_payload["name"] == ""  # present but empty stays empty
    assert note.email_body == "ERROR MISSING/MISSING/"


def test_a_payload_that_is_not_json_is_a_problem_not_garbage() -> None:
    rule = Rule(rule="True", notification_webhook="http://x", notification_payload='"a": {{ x')
    note = render_notification("error", "r", rule, "t4")
    assert note.problem is not None and "notification_payload of rule 'r'" in note.problem
    rule = Rule(rule="True", notification_webhook="http://x", notification_payload='"a": b')
    note = render_notification("error", "r", rule, "t4")
    assert note.problem is not None and "not JSON once wrapped in braces" in note.problem
