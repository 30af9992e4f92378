"""Streaming: instances of an arriving series go out over one association as they come."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob
from mercure.testing import config_for, dcmtk_storescu, make_series, start_router, wait_for
from mercure_target_dicom import DicomTarget, DicomTargetConfig
from mercure_target_dicom.sender import Peer, Sender
from pydicom.uid import MRImageStorage, generate_uid


def scripted_more(batches: list[list[Path] | None]) -> tuple[Callable[[float], Any], list[float]]:
    """A ``DeliveryJob.more`` that hands out ``batches`` one call at a time."""
    calls: list[float] = []
    queue: Iterator[list[Path] | None] = iter(batches)

    def more(timeout: float) -> list[Path] | None:
        calls.append(timeout)
        batch = next(queue)
        if batch == []:
            time.sleep(timeout)  # like the dispatcher's: wait, then report that nothing came
        return batch

    return more, calls


def streaming_job(files: list[Path], more: Callable[[float], Any]) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="pacs"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task, more=more)


def target_for(port: int) -> DicomTarget:
    config = DicomTargetConfig(ip="127.0.0.1", port=str(port), aet_target="RECORDER", timeout=10)
    return DicomTarget("pacs", config)


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_arriving_files_share_one_association(tmp_path: Path, recording_scp: Any) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 6)
    more, calls = scripted_more([[files[2]], [], [files[3], files[4]], [files[5]], None])
    result = target_for(scp.port).send(streaming_job(files[:2], more))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert result.failed == {}
    assert len(scp.associations) == 1
    assert scp.associations[0] == [uid(f) for f in files]  # in the order they arrived
    assert len(calls) == 5


def test_a_new_sop_class_mid_series_gets_its_own_association(
    tmp_path: Path, recording_scp: Any
) -> None:
    scp = recording_scp()
    ct = make_series(tmp_path / "s", 3)
    mr = make_series(tmp_path / "s", 2, sop_class=MRImageStorage, modality="MR")
    more, _ = scripted_more([[ct[2], mr[0]], [mr[1]], None])
    result = target_for(scp.port).send(streaming_job(ct[:2], more))
    assert sorted(result.delivered) == sorted(f.name for f in ct + mr)
    assert len(scp.associations) == 2
    assert scp.associations[0] == [uid(f) for f in ct]
    assert sorted(scp.associations[1]) == sorted(uid(f) for f in mr)


def test_a_drop_mid_stream_stops_asking_for_more(tmp_path: Path, recording_scp: Any) -> None:
    scp = recording_scp(abort_after=2)
    files = make_series(tmp_path / "s", 5)
    more, calls = scripted_more([[files[2]], [files[3], files[4]], None])
    result = target_for(scp.port).send(streaming_job(files[:2], more))
    assert sorted(result.delivered) == sorted(f.name for f in files[:2])
    assert set(result.failed) == {files[2].name}  # handed out, sent, never answered
    assert result.error is not None and "aborted the association" in result.error
    assert len(calls) == 1  # nothing more was taken that could not be sent


def test_a_stopping_dispatcher_ends_the_stream(tmp_path: Path, recording_scp: Any) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 2)
    calls: list[float] = []

    def more(timeout: float) -> list[Path]:
        calls.append(timeout)
        return []  # at once: what the dispatcher's more() does once it is told to stop

    peer = Peer("127.0.0.1", scp.port, "RECORDER", "MERCURE", timeout=10)
    outcome = Sender(peer).stream(files, more, idle_release=60)
    assert sorted(outcome.delivered) == sorted(f.name for f in files)
    assert len(calls) == 1


def test_an_idle_association_is_released(tmp_path: Path, recording_scp: Any) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 2)
    calls: list[float] = []

    def more(timeout: float) -> list[Path]:
        calls.append(timeout)
        time.sleep(timeout)  # like the dispatcher's: wait, then report that nothing came
        return []

    peer = Peer("127.0.0.1", scp.port, "RECORDER", "MERCURE", timeout=10)
    outcome = Sender(peer).stream(files, more, idle_release=0.2)
    assert sorted(outcome.delivered) == sorted(f.name for f in files)
    assert calls and all(t <= 0.2 for t in calls)
    assert len(scp.associations) == 1


@pytest.mark.peer
@pytest.mark.slow
def test_router_streams_a_series_before_it_is_complete(tmp_path: Path, recording_scp: Any) -> None:
    scp = recording_scp()
    config = config_for(
        tmp_path,
        targets={
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(scp.port),
                "aet_target": "RECORDER",
            }
        },
        rules={"all": {"rule": "True", "target": "pacs"}},
        series_complete_trigger=600,  # the series is not complete while this test runs
        early_dispatch=True,
    )
    series = generate_uid()
    files = make_series(tmp_path / "series", 8, series_uid=series)
    runs = start_router(config)
    router = next(runs)
    try:
        dcmtk_storescu(files, router.port)
        wait_for(lambda: len(scp.stored()) == 8, timeout=60, what="8 instances streamed")
        assert scp.stored() == {uid(f) for f in files}
        # The job is still open (its series may grow) and records what was delivered.
        outgoing = Path(config.outgoing_folder)

        def delivered() -> bool:
            tasks = [pydicom_free_task(p) for p in outgoing.iterdir() if p.is_dir()]
            return any(
                len(t.get("dispatch", {}).get("delivered", {}).get("pacs", [])) == 8 for t in tasks
            )

        wait_for(delivered, timeout=30, what="task.json recording 8 delivered")
    finally:
        runs.close()


def pydicom_free_task(folder: Path) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads((folder / "task.json").read_text()))
    except (OSError, ValueError):
        return {}
