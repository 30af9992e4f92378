"""MPPS records and what the router reads from them (the DICOM side: tests/e2e/test_mpps.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mercure.mpps import (
    STATUS_DUPLICATE,
    STATUS_NO_SUCH_INSTANCE,
    STATUS_NOT_UPDATABLE,
    STATUS_SUCCESS,
    MppsIndex,
    MppsStore,
)
from pydicom.dataset import Dataset

STUDY = "1.2.3.4"


def step(status: str, series: dict[str, list[str]] | None = None) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    scheduled = Dataset()
    scheduled.StudyInstanceUID = STUDY
    ds.ScheduledStepAttributesSequence = [scheduled]
    items = []
    for uid, instances in (series or {}).items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        refs = []
        for sop in instances:
            ref = Dataset()
            ref.ReferencedSOPInstanceUID = sop
            refs.append(ref)
        item.ReferencedImageSequence = refs
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


def modification(status: str, series: dict[str, list[str]]) -> Dataset:
    full = step(status, series)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = full.PerformedProcedureStepStatus
    ds.PerformedSeriesSequence = full.PerformedSeriesSequence
    return ds


def test_create_update_and_what_the_index_makes_of_it(tmp_path: Path) -> None:
    store = MppsStore(tmp_path / ".mpps", fsync=False)
    index = MppsIndex(store.folder)
    assert store.create("9.1", step("IN PROGRESS"), "MOD@127.0.0.1") == STATUS_SUCCESS
    assert store.create("9.1", step("IN PROGRESS"), "MOD@127.0.0.1") == STATUS_DUPLICATE
    assert store.update("9.9", step("COMPLETED"), "MOD") == STATUS_NO_SUCH_INSTANCE
    index.refresh()
    assert index.study_complete(STUDY, {"5.1"}, {"6.1.dcm"}) is None  # still in progress
    series = {"5.1": ["6.1", "6.2"], "5.2": ["6.3"]}
    assert store.update("9.1", modification("COMPLETED", series), "MOD") == STATUS_SUCCESS
    assert store.update("9.1", modification("COMPLETED", series), "MOD") == STATUS_NOT_UPDATABLE
    record = store.read("9.1")
    assert record is not None and record["status"] == "COMPLETED"
    assert record["studies"] == [STUDY] and record["series"] == series
    index.refresh()
    assert index.series_complete("5.1", {"6.1.dcm", "6.2.dcm"})
    assert not index.series_complete("5.1", {"6.1.dcm"})
    assert not index.series_complete("5.3", {"6.1.dcm"})
    everything = {"6.1.dcm", "6.2.dcm", "6.3.dcm"}
    assert index.study_complete(STUDY, {"5.1", "5.2"}, everything) == {"5.1", "5.2"}
    assert index.study_complete(STUDY, {"5.1"}, everything) is None  # a series missing
    assert index.study_complete(STUDY, {"5.1", "5.2"}, {"6.1.dcm"}) is None  # instances missing


def test_a_discontinued_step_or_a_second_open_step_completes_nothing(tmp_path: Path) -> None:
    store = MppsStore(tmp_path / ".mpps", fsync=False)
    store.create("9.1", step("IN PROGRESS"), "MOD")
    store.update("9.1", modification("DISCONTINUED", {"5.1": ["6.1"]}), "MOD")
    store.create("9.2", step("IN PROGRESS"), "MOD")
    store.update("9.2", modification("COMPLETED", {"5.2": ["6.2"]}), "MOD")
    store.create("9.3", step("IN PROGRESS", {"5.3": []}), "MOD")
    index = MppsIndex(store.folder)
    index.refresh()
    assert not index.series_complete("5.1", {"6.1.dcm"})
    assert index.series_complete("5.2", {"6.2.dcm"})
    # Step 9.3 of the same study is still in progress: the study waits for the timers.
    assert index.study_complete(STUDY, {"5.1", "5.2", "5.3"}, {"6.1.dcm", "6.2.dcm"}) is None


def test_old_records_are_removed(tmp_path: Path) -> None:
    store = MppsStore(tmp_path / ".mpps", fsync=False)
    store.create("9.1", step("COMPLETED", {"5.1": ["6.1"]}), "MOD")
    path = store.path("9.1")
    data = json.loads(path.read_text())
    data["updated_at"] = time.time() - 8 * 86400
    path.write_text(json.dumps(data))
    os.utime(path, (time.time() + 1, time.time() + 1))
    index = MppsIndex(store.folder)
    index.refresh()
    assert not path.exists() and index.series_instances == {}
    assert sorted(os.listdir(store.folder)) == []  # its lock file went with it
