"""Delivery to DCMTK's storescp: whole series arrive with their datasets byte-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import DcmtkStoreSCP, dataset_bytes, free_port, make_series
from mercure_target_dicom import DicomTarget, DicomTargetConfig
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

pytestmark = pytest.mark.peer


def job_for(files: list[Path], tags: dict[str, str] | None = None) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="pacs"),
    )
    return DeliveryJob("job-1", files[0].parent, files, tags or {}, task)


def dicom_target(port: int, aet: str = "STORESCP", **extra: object) -> DicomTarget:
    return DicomTarget(
        "pacs", DicomTargetConfig(ip="127.0.0.1", port=str(port), aet_target=aet, **extra)
    )


def received_by_uid(scp: DcmtkStoreSCP) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.received()
    }


def assert_identical(sent: list[Path], received: dict[str, Path]) -> None:
    """Every sent file arrived with the same encoded dataset (pixel data included)."""
    assert len(received) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        got = received[str(original.SOPInstanceUID)]
        assert dataset_bytes(got) == dataset_bytes(path), f"{path.name} changed in transit"
        arrived = pydicom.dcmread(got)
        assert arrived == original
        assert arrived.PixelData == original.PixelData
        assert arrived.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_200_instances_arrive_byte_identical(tmp_path: Path, dcmtk_storescp: DcmtkStoreSCP) -> None:
    files = make_series(tmp_path / "series", 200)
    result = dicom_target(dcmtk_storescp.port).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert result.failed == {} and result.error is None
    assert_identical(files, received_by_uid(dcmtk_storescp))


def test_two_sop_classes_and_two_syntaxes_arrive_whole(
    tmp_path: Path, dcmtk_storescp: DcmtkStoreSCP
) -> None:
    folder = tmp_path / "mixed"
    series, study = generate_uid(), generate_uid()
    files = [
        *make_series(
            folder,
            5,
            series_uid=series,
            study_uid=study,
            sop_class=CTImageStorage,
            transfer_syntax=ExplicitVRLittleEndian,
        ),
        *make_series(
            folder,
            5,
            series_uid=series,
            study_uid=study,
            sop_class=CTImageStorage,
            transfer_syntax=ImplicitVRLittleEndian,
        ),
        *make_series(
            folder,
            5,
            series_uid=series,
            study_uid=study,
            sop_class=MRImageStorage,
            modality="MR",
            transfer_syntax=ImplicitVRLittleEndian,
        ),
        *make_series(
            folder,
            5,
            series_uid=series,
            study_uid=study,
            sop_class=MRImageStorage,
            modality="MR",
            transfer_syntax=ExplicitVRLittleEndian,
        ),
    ]
    result = dicom_target(dcmtk_storescp.port).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert result.failed == {}
    received = received_by_uid(dcmtk_storescp)
    assert_identical(files, received)
    classes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in received.values()
    }
    assert classes == {CTImageStorage, MRImageStorage}


def test_connection_refused_raises_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(TargetError) as info:
        dicom_target(port).send(job_for(make_series(tmp_path / "one", 1)))
    text = str(info.value)
    assert f"connection to 127.0.0.1:{port} refused" in text
    assert "check that the peer is running" in text


def test_c_echo_reports_one_line(dcmtk_storescp: DcmtkStoreSCP) -> None:
    line = dicom_target(dcmtk_storescp.port).test_connection()
    assert line.startswith(f"C-ECHO to STORESCP@127.0.0.1:{dcmtk_storescp.port} succeeded in ")
    assert line.endswith(" ms") and "\n" not in line


def test_cli_targets_test(tmp_path: Path, dcmtk_storescp: DcmtkStoreSCP) -> None:
    down = free_port()
    config = {
        **{
            f"{n}_folder": str(tmp_path / n)
            for n in (
                "incoming",
                "studies",
                "outgoing",
                "success",
                "error",
                "discard",
                "processing",
            )
        },
        "targets": {
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(dcmtk_storescp.port),
                "aet_target": "STORESCP",
            },
            "down": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(down),
                "aet_target": "NOBODY",
            },
        },
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(config))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from mercure.cli import main; main()", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = cli("targets", "test", "pacs", "--config", str(path))
    assert ok.returncode == 0, ok.stderr
    assert f"pacs: OK: C-ECHO to STORESCP@127.0.0.1:{dcmtk_storescp.port} succeeded" in ok.stdout
    bad = cli("targets", "test", "down", "--config", str(path))
    assert bad.returncode == 1
    assert f"down: FAILED: C-ECHO to NOBODY@127.0.0.1:{down}: connection to" in bad.stderr + (
        bad.stdout
    )
