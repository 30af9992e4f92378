"""STOW-RS answers are read per instance, in JSON and in XML."""

from __future__ import annotations

import json

from mercure_target_dicomweb.response import describe_reason, parse_answer


def dataset(referenced: list[dict], failed: list[dict], **top: object) -> bytes:
    data: dict[str, object] = {
        "00081199": {"vr": "SQ", "Value": referenced},
        "00081198": {"vr": "SQ", "Value": failed},
    }
    for tag, value in top.items():
        data[tag] = {"vr": "US", "Value": [value]}
    return json.dumps(data).encode()


def item(uid: str, **extra: int) -> dict:
    found: dict[str, object] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    for tag, code in extra.items():
        found[tag.removeprefix("t")] = {"vr": "US", "Value": [code]}
    return found


def test_json_answer_per_instance() -> None:
    body = dataset(
        [item("1.1"), item("1.2", t00081196=0xB000)],
        [item("1.3", t00081197=0xA700), item("1.4", t00081197=0x0111)],
    )
    answer = parse_answer(body, "application/dicom+json")
    assert answer.readable
    assert answer.stored == {"1.1", "1.2"}
    assert answer.warnings == {"1.2": 0xB000}
    assert answer.failed == {"1.3": 0xA700, "1.4": 0x0111}


def test_empty_sequences_as_orthanc_writes_them() -> None:
    body = b'{"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]}, "00081198": {"vr": "SQ"}}'
    answer = parse_answer(body, "")  # Orthanc's 400 answer has no Content-Type
    assert answer.readable and answer.stored == set() and answer.failed == {}


def test_xml_answer_per_instance() -> None:
    body = b"""<?xml version="1.0"?>
<NativeDicomModel>
  <DicomAttribute tag="00081199" vr="SQ">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.1</Value></DicomAttribute>
      <DicomAttribute tag="00081196" vr="US"><Value number="1">45056</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081198" vr="SQ">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">49152</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>"""
    answer = parse_answer(body, "application/dicom+xml")
    assert answer.stored == {"1.1"} and answer.warnings == {"1.1": 0xB000}
    assert answer.failed == {"1.2": 0xC000}


def test_unreadable_answers() -> None:
    for body, ctype in [
        (b"", ""),
        (b"<html><body>Bad Gateway</body></html>", "text/html"),
        (b'{"HttpError": "Unauthorized"}', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"{not json", "application/dicom+json"),
    ]:
        assert not parse_answer(body, ctype).readable, body


def test_reasons_in_words() -> None:
    assert describe_reason(0xA700) == "0xA700 (Refused: Out of Resources)"
    assert describe_reason(0xA7FF) == "0xA7FF (Refused: Out of Resources)"
    assert describe_reason(0xC122) == "0xC122 (Referenced Transfer Syntax not supported)"
    assert describe_reason(0xC005) == "0xC005 (Error: Cannot understand)"
    assert describe_reason(0xB000) == "0xB000 (Coercion of data elements)"
    assert describe_reason(None) == "no reason given"
