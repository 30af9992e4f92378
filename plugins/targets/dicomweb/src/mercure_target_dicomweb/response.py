"""Reading a STOW-RS answer per instance (PS3.18 10.5.3).

The answer is a DICOM dataset in JSON (``application/dicom+json``) or XML
(``application/dicom+xml``) with a ReferencedSOPSequence (0008,1199) of the instances stored,
each optionally with a WarningReason (0008,1196), and a FailedSOPSequence (0008,1198) of those
that were not, each with a FailureReason (0008,1197). Some servers put a body with these
sequences even on a 4xx answer (Orthanc does on 400): it is read whatever the status.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

#: Failure and warning reasons of the Storage Service (PS3.4 Annex B, PS3.7 Annex C) that
#: STOW-RS answers use.
FAILURE_MEANINGS = {
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0122: "Referenced SOP Class not supported",
    0x0124: "Not authorized",
    0xC122: "Referenced Transfer Syntax not supported",
}
WARNING_MEANINGS = {
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP Class",
}
DUPLICATE_SOP_INSTANCE = 0x0111


def describe_reason(code: int | None) -> str:
    """A failure or warning code in words, e.g. ``0xA700 (Refused: Out of Resources)``."""
    if code is None:
        return "no reason given"
    meaning = FAILURE_MEANINGS.get(code) or WARNING_MEANINGS.get(code)
    if meaning is None:
        high = code >> 8
        if high == 0xA7:
            meaning = "Refused: Out of Resources"
        elif high == 0xA9:
            meaning = "Error: Data Set does not match SOP Class"
        elif code >> 12 == 0xC:
            meaning = "Error: Cannot understand"
        elif code >> 12 == 0xB:
            meaning = "Warning"
        else:
            meaning = "unknown reason"
    return f"0x{code:04X} ({meaning})"


@dataclass
class StowAnswer:
    """What a STOW-RS answer says about each SOP Instance UID."""

    stored: set[str] = field(default_factory=set)
    failed: dict[str, int | None] = field(default_factory=dict)
    warnings: dict[str, int | None] = field(default_factory=dict)
    #: A WarningReason on the answer as a whole, not on one instance.
    warning: int | None = None
    readable: bool = True


def parse_answer(body: bytes, content_type: str = "") -> StowAnswer:
    """Read a STOW-RS answer; ``readable`` is False when the body is neither JSON nor XML."""
    text = body.strip()
    if not text:
        return StowAnswer(readable=False)
    try:
        if text[:1] == b"{" or "json" in content_type:
            return _from_json(json.loads(text))
        if text[:1] == b"<" or "xml" in content_type:
            return _from_xml(ET.fromstring(text))
    except (ValueError, ET.ParseError, TypeError, AttributeError, KeyError):
        pass
    return StowAnswer(readable=False)


def _json_values(dataset: dict[str, Any], tag: str) -> list[Any]:
    element = dataset.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _first_int(dataset: dict[str, Any], tag: str) -> int | None:
    values = _json_values(dataset, tag)
    return int(values[0]) if values and values[0] is not None else None


def _from_json(dataset: Any) -> StowAnswer:
    if not isinstance(dataset, dict):
        raise ValueError("a STOW-RS answer is one dataset (a JSON object)")
    if REFERENCED_SOP_SEQUENCE not in dataset and FAILED_SOP_SEQUENCE not in dataset:
        return StowAnswer(readable=False)
    answer = StowAnswer(warning=_first_int(dataset, WARNING_REASON))
    for item in _json_values(dataset, REFERENCED_SOP_SEQUENCE):
        uids = _json_values(item, REFERENCED_SOP_INSTANCE_UID)
        if not uids:
            continue
        uid = str(uids[0])
        answer.stored.add(uid)
        if WARNING_REASON in item:
            answer.warnings[uid] = _first_int(item, WARNING_REASON)
    for item in _json_values(dataset, FAILED_SOP_SEQUENCE):
        uids = _json_values(item, REFERENCED_SOP_INSTANCE_UID)
        if uids:
            answer.failed[str(uids[0])] = _first_int(item, FAILURE_REASON)
    return answer


def _xml_attributes(element: ET.Element, tag: str) -> list[ET.Element]:
    return [a for a in element.findall("DicomAttribute") if a.get("tag", "").upper() == tag]


def _xml_value(element: ET.Element, tag: str) -> str | None:
    for attr in _xml_attributes(element, tag):
        value = attr.find("Value")
        if value is not None and value.text:
            return value.text.strip()
    return None


def _xml_int(element: ET.Element, tag: str) -> int | None:
    value = _xml_value(element, tag)
    return int(value) if value is not None else None


def _from_xml(root: ET.Element) -> StowAnswer:
    if root.tag != "NativeDicomModel":
        raise ValueError("not a DICOM Native XML model")
    referenced = _xml_attributes(root, REFERENCED_SOP_SEQUENCE)
    failed = _xml_attributes(root, FAILED_SOP_SEQUENCE)
    if not referenced and not failed:
        return StowAnswer(readable=False)
    answer = StowAnswer(warning=_xml_int(root, WARNING_REASON))
    for seq in referenced:
        for item in seq.findall("Item"):
            uid = _xml_value(item, REFERENCED_SOP_INSTANCE_UID)
            if uid:
                answer.stored.add(uid)
                if _xml_attributes(item, WARNING_REASON):
                    answer.warnings[uid] = _xml_int(item, WARNING_REASON)
    for seq in failed:
        for item in seq.findall("Item"):
            uid = _xml_value(item, REFERENCED_SOP_INSTANCE_UID)
            if uid:
                answer.failed[uid] = _xml_int(item, FAILURE_REASON)
    return answer
