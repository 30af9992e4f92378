"""Tag patterns name files and objects from hostile tag values without leaving the base folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mercure.instances import InstanceIndex, read_instance
from mercure.patterns import PatternError, TagPattern, TagPatternField, safe_value
from mercure.testing import make_series
from pydantic import BaseModel

LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"


def test_renders_the_usual_layout() -> None:
    pattern = TagPattern.parse(LAYOUT)
    assert pattern.fields == (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    )
    path = pattern.render(
        {"PatientID": "MRN1", "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3",
         "SOPInstanceUID": "1.2.3.4"}
    )  # fmt: skip
    assert path == "MRN1/1.2/1.2.3/1.2.3.4.dcm"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("../../etc", "_.._etc"),
        ("..", "UNKNOWN"),
        ("a/b\\c", "a_b_c"),
        ("x\x00y\n", "x_y"),
        ("", "UNKNOWN"),
        ("   ", "UNKNOWN"),
        (".hidden", "hidden"),
        ("Müller^Anna", "Müller^Anna"),
    ],
)
def test_hostile_values_stay_one_component(value: str, expected: str) -> None:
    assert safe_value(value) == expected
    rendered = TagPattern.parse("{PatientID}/x").render({"PatientID": value})
    assert rendered == f"{expected}/x"
    assert ".." not in rendered.split("/")


def test_missing_values_get_a_placeholder() -> None:
    assert TagPattern.parse("{AccessionNumber}/{filename}").render({"filename": "a.dcm"}) == (
        "UNKNOWN/a.dcm"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{PatientId}/x", "not a DICOM keyword"),
        ("/abs/{PatientID}", "relative"),
        ("../{PatientID}", "'..'"),
        ("a/./{PatientID}", "'..'"),
        ("{PatientID:>10}", "format options"),
        ("{PatientID!r}", "format options"),
        ("{", "Single '{'"),
        ("", "non-empty"),
    ],
)
def test_bad_patterns_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(PatternError, match=reason):
        TagPattern.parse(text)


def test_pattern_field_in_a_settings_model() -> None:
    class Settings(BaseModel):
        key_pattern: TagPatternField = TagPattern.parse("{SeriesInstanceUID}/{filename}")

    assert Settings().model_dump() == {"key_pattern": "{SeriesInstanceUID}/{filename}"}
    assert Settings(key_pattern="{task_id}/{filename}").key_pattern.fields == (
        "task_id",
        "filename",
    )
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        Settings(key_pattern="{Nope}")


def test_instance_index_maps_files_and_uids(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 4)
    junk = tmp_path / "s" / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    index = InstanceIndex([*files, junk])
    assert len(index) == 4
    assert "junk.dcm" in index.unreadable
    for path in files:
        info = read_instance(path)
        assert index.by_uid(info.sop_instance_uid) == info
        assert index.by_name(path.name) == info
        assert index.tags(path.name, ["InstanceNumber"])["SOPInstanceUID"] == info.sop_instance_uid
    uids = [read_instance(f).sop_instance_uid for f in files[:2]]
    assert index.names_for([*uids, "9.9.9"]) == [f.name for f in files[:2]]
