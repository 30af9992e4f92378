"""MPPS: a study released as soon as the modality says it is done, not after the timers.

``mercure run`` with both quiet timers at an hour. pynetdicom, as the modality, opens a
procedure step (N-CREATE, IN PROGRESS) for a study, sends its two series with DCMTK's
storescu -- all but the last instance -- and reports the step COMPLETED (N-SET) listing both
series and every instance. The study job is released once the last listed instance is in.
A step that lists an instance that never comes leaves its study to the timers.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from e2e_support import (
    ProcessFactory,
    folder_of,
    read_task,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.mpps import MPPS_SOP_CLASS
from mercure.testing import make_series
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def performed_series(series: list[list[Path]]) -> list[Dataset]:
    items = []
    for files in series:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        item = Dataset()
        item.SeriesInstanceUID = first.SeriesInstanceUID
        item.SeriesDescription = first.SeriesDescription
        refs = []
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            refs.append(ref)
        item.ReferencedImageSequence = refs
        items.append(item)
    return items


class Modality:
    """pynetdicom as the modality's MPPS SCU."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MPPS_SOP_CLASS)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="MERCURE")
        assert self.assoc.is_established

    def create(self, uid: str, study_uid: str) -> int:
        ds = Dataset()
        step = Dataset()
        step.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = [step]
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.PerformedProcedureStepID = "1"
        ds.PerformedSeriesSequence = []
        status, _ = self.assoc.send_n_create(ds, MPPS_SOP_CLASS, uid)
        return int(status.Status)

    def complete(self, uid: str, series: list[list[Path]]) -> int:
        ds = Dataset()
        ds.PerformedProcedureStepStatus = "COMPLETED"
        ds.PerformedSeriesSequence = performed_series(series)
        status, _ = self.assoc.send_n_set(ds, MPPS_SOP_CLASS, uid)
        return int(status.Status)

    def close(self) -> None:
        self.assoc.release()


def study_jobs(folder: Path, study_uid: str) -> list[dict]:
    tasks = [read_task(p) for p in visible_entries(folder) if p.is_dir()]
    return [t for t in tasks if t and t["info"]["uid"] == study_uid]


def test_a_completed_step_releases_its_study_once_the_last_instance_is_in(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    target = tmp_path / "archive"
    target.mkdir()
    config = spool_config(
        tmp_path,
        series_complete_trigger=3600,
        study_complete_trigger=3600,
        study_forcecomplete_trigger=7200,
        targets={"archive": {"target_type": "folder", "folder": str(target)}},
        rules={"study": {"rule": "True", "target": "archive", "action_trigger": "study"}},
    )
    path = write_config(tmp_path / "mercure.json", config)
    router = mercure_processes.start("router", "run", "--config", str(path))
    success, studies = folder_of(config, "success"), folder_of(config, "studies")

    study_uid = generate_uid()
    one = make_series(tmp_path / "one", 3, study_uid=study_uid, series_description="AX")
    two = make_series(tmp_path / "two", 4, study_uid=study_uid, series_description="SAG")
    modality = Modality(config["port"])
    try:
        step = generate_uid()
        assert modality.create(step, study_uid) == 0
        assert modality.create(step, study_uid) == 0x0111  # a duplicate is refused
        storescu(one + two[:-1], config["port"])
        assert modality.complete(step, [one, two]) == 0
        assert modality.complete(step, [one, two]) == 0xA710  # completed: no more changes
        assert modality.complete(generate_uid(), [one]) == 0x0112  # no such step
    finally:
        modality.close()

    # The first series is complete by MPPS and goes into the study at once; the second
    # waits for its last instance (its quiet time is an hour).
    wait_until(lambda: visible_entries(studies), 30, "the first series in its study")
    assert study_jobs(success, study_uid) == []
    storescu(two[-1:], config["port"])
    [job] = wait_until(lambda: study_jobs(success, study_uid), 60, "the study job delivered")
    assert sorted(job["study"]["received_series"]) == ["AX", "SAG"]
    assert job["collection"]["released"].startswith("MPPS")
    delivered = {p.name for p in (target / job["id"]).glob("*.dcm")}
    assert len(delivered) == 7
    assert "series complete: MPPS listed instances all in" in router.output()


def test_listed_instances_that_never_come_leave_the_study_to_the_timers(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    target = tmp_path / "archive"
    target.mkdir()
    config = spool_config(
        tmp_path,
        series_complete_trigger=2,
        study_complete_trigger=3,
        targets={"archive": {"target_type": "folder", "folder": str(target)}},
        rules={"study": {"rule": "True", "target": "archive", "action_trigger": "study"}},
    )
    path = write_config(tmp_path / "mercure.json", config)
    mercure_processes.start("router", "run", "--config", str(path))
    study_uid = generate_uid()
    series = make_series(tmp_path / "one", 3, study_uid=study_uid, series_description="AX")
    modality = Modality(config["port"])
    try:
        step = generate_uid()
        assert modality.create(step, study_uid) == 0
        storescu(series[:-1], config["port"])  # the last listed instance never comes
        assert modality.complete(step, [series]) == 0
    finally:
        modality.close()
    [job] = wait_until(
        lambda: study_jobs(folder_of(config, "success"), study_uid), 60, "the study by timeout"
    )
    assert job["collection"]["released"].startswith("timeout")
    assert len(list((target / job["id"]).glob("*.dcm"))) == 2
