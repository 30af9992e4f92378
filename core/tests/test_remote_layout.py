"""Staged delivery into a remote folder: names, the completion marker and the delivery plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from mercure.jobs.task import Task, TaskInfo
from mercure.patterns import TagPattern
from mercure.remote_layout import (
    DeliveryPlan,
    RemoteLayout,
    SeriesPaths,
    base_folder,
    check_file_pattern,
    check_folder_pattern,
    marker_names,
    marker_probe,
    marker_record,
    marker_text,
    series_paths,
)
from mercure.targets import DeliveryJob
from mercure.testing import make_series

TASK = "0b6f1a4e-5d2c-4c55-9a43-3f7e1d2c9b10"


def job_of(files: list[Path], tags: dict[str, str] | None = None) -> DeliveryJob:
    task = Task(info=TaskInfo(action="route", uid="1.2.3"), id=TASK)
    folder = files[0].parent if files else Path(".")
    return DeliveryJob(TASK, folder, files, dict(tags or {}), task)


# -- folders ------------------------------------------------------------------------------------


def test_mercures_layout_with_the_default_folder_pattern() -> None:
    paths = series_paths("/data/in/", TASK, TASK)
    assert paths == SeriesPaths(
        base="/data/in",
        final=f"/data/in/{TASK}",
        alternate=f"/data/in/{TASK}_{TASK}",
        staging=f"/data/in/.{TASK}.partial",
    )
    assert paths.parent == "/data/in"


def test_a_nested_folder_is_staged_beside_its_final_name() -> None:
    paths = series_paths("in", "P1/1.2/1.2.3", TASK)
    assert paths.base == "in" and paths.final == "in/P1/1.2/1.2.3"
    assert paths.parent == "in/P1/1.2"
    assert paths.staging == f"in/P1/1.2/.1.2.3.{TASK}.partial"
    assert paths.alternate == f"in/P1/1.2/1.2.3_{TASK}"


@pytest.mark.parametrize(
    ("folder", "base"), [("", "."), (".", "."), ("a//b/", "a/b"), ("/x/./y", "/x/y")]
)
def test_the_base_folder_as_the_server_sees_it(folder: str, base: str) -> None:
    assert base_folder(folder) == base
    assert series_paths(folder, "s", TASK).base == base


def layout(file_pattern: str = "{filename}", folder_pattern: str = "{task_id}") -> RemoteLayout:
    return RemoteLayout(
        "/srv/", TagPattern.parse(folder_pattern), TagPattern.parse(file_pattern), "t"
    )


def test_job_paths_render_the_series_tags_task_id_and_target() -> None:
    job = job_of([], {"PatientID": "../../etc"})
    paths = layout(folder_pattern="{target}/{PatientID}/{task_id}").paths(job)
    assert paths.final == f"/srv/t/_.._etc/{TASK}"
    assert paths.staging == f"/srv/t/_.._etc/.{TASK}.partial"
    assert layout().base == "/srv"


# -- the marker ---------------------------------------------------------------------------------


def test_the_marker_names_its_job_and_target() -> None:
    text = marker_text(TASK, "cluster")
    assert text == marker_record(TASK, "cluster") + "\n" and "\n" not in marker_record(TASK, "t")
    assert json.loads(text) == {"task_id": TASK, "target": "cluster"}
    assert marker_names(text, TASK)
    assert not marker_names(text, "another-task")


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"task": "x"}', "null"])
def test_a_marker_of_someone_else_is_not_this_jobs(text: str) -> None:
    """mercure writes ``.complete`` empty; other tools may write anything."""
    assert not marker_names(text, TASK)


def test_the_probe_finds_the_marker_of_its_job_only() -> None:
    """The probe is what a ``grep -F`` on the server looks for in a marker."""
    assert marker_probe(TASK) in marker_record(TASK, "any target")
    assert marker_probe(TASK) not in marker_record("1" + TASK[1:], "any target")
    assert marker_probe(TASK) not in marker_record(TASK + "0", "any target")


# -- pattern rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{SeriesNumber}.dcm", "must contain {filename} or {SOPInstanceUID}"),
        ("x/.h{filename}", "file_pattern 'x/.h{filename}': names starting with '.' are hidden"),
    ],
)
def test_bad_file_patterns(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace(".", r"\.")):
        check_file_pattern(TagPattern.parse(text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{SeriesInstanceUID}/{SOPInstanceUID}", "uses SOPInstanceUID, which differs between"),
        ("{InstanceNumber}/{filename}", "uses InstanceNumber, filename, which differs"),
        ("x/.h{task_id}", "folder_pattern 'x/.h{task_id}': names starting with '.' are hidden"),
    ],
)
def test_bad_folder_patterns(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_folder_pattern(TagPattern.parse(text))
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["{filename}", "{SeriesNumber}/{SOPInstanceUID}.dcm"])
def test_good_file_patterns_pass_unchanged(text: str) -> None:
    pattern = TagPattern.parse(text)
    assert check_file_pattern(pattern) is pattern


# -- the plan -----------------------------------------------------------------------------------


def test_plan_by_file_name_reads_no_header(tmp_path: Path) -> None:
    """With ``{filename}`` alone, not even DICOM files are opened: any file is sent as it is."""
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for path in files:
        path.write_bytes(b"not DICOM, never read")
    plan = layout("{target}-{filename}").plan(job_of(files))
    assert plan.failed == {}
    assert plan.files == {"t-a.dcm": files[0], "t-b.dcm": files[1]}
    assert plan.paths == series_paths("/srv", TASK, TASK)


def test_plan_by_header_tags(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 3)
    plan = layout("{target}/{SeriesNumber}/{SOPInstanceUID}.dcm").plan(job_of(files))
    assert plan.failed == {}
    expected = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected[f"t/{ds.SeriesNumber}/{ds.SOPInstanceUID}.dcm"] = path
    assert plan.files == expected


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("unreadable", "cannot read junk.dcm"),
        ("same path", "file_pattern gives"),
        ("missing", "is missing from the job folder"),
    ],
)
def test_plan_names_the_files_that_cannot_be_sent(
    problem: str, reason: str, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "s", 2)
    pattern = "{SOPInstanceUID}.dcm"
    if problem == "unreadable":
        bad = tmp_path / "s" / "junk.dcm"
        bad.write_bytes(b"not DICOM at all")
    elif problem == "same path":
        bad = tmp_path / "s" / "copy.dcm"
        shutil.copyfile(files[0], bad)
    else:
        bad = tmp_path / "s" / "gone.dcm"
        pattern = "{filename}"
    plan = layout(pattern).plan(job_of([*files, bad]))
    assert list(plan.failed) == [bad.name] and reason in plan.failed[bad.name]
    assert sorted(plan.files.values()) == sorted(files)
    if problem == "same path":
        assert "include {SOPInstanceUID} or {filename}" in plan.failed[bad.name]


def plan_of(files: dict[str, Path], failed: dict[str, str] | None = None) -> DeliveryPlan:
    job = job_of(list(files.values()))
    return DeliveryPlan(job, "t", series_paths("/srv", TASK, TASK), files, dict(failed or {}))


def test_incomplete_fails_the_job_at_once_without_sending() -> None:
    failed = {"a.dcm": "cannot read", "b.dcm": "missing"}
    result = plan_of({}, failed).incomplete()
    assert result.permanent and result.delivered == []
    assert result.failed == {"a.dcm": "cannot read", "b.dcm": "missing"}
    assert result.error == (
        "not sent: the series would be incomplete without 2 instance(s) that cannot be sent"
    )


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


@pytest.mark.parametrize(
    ("already", "event"),
    [(False, "series delivered"), (True, "series was complete already")],
)
def test_delivered_logs_and_reports_every_planned_file(already: bool, event: str) -> None:
    log = _Log()
    planned = {"1/a.dcm": Path("/job/a.dcm"), "1/b.dcm": Path("/job/b.dcm")}
    result = plan_of(planned).delivered(log, "/srv/x", 1, already_complete=already)
    assert result.delivered == ["a.dcm", "b.dcm"] and not result.failed and not result.error
    assert log.lines == [
        (
            event,
            {"target": "t", "task_id": TASK, "folder": "/srv/x", "uploaded": 1, "already_there": 1},
        )
    ]
