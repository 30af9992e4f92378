"""Delivery to a real Orthanc: what it lists over REST is what was sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from mercure.testing import make_series
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, generate_uid

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_orthanc_lists_every_delivered_instance(
    tmp_path: Path, orthanc: Any, dispatch_env: Any
) -> None:
    study = generate_uid()
    files = [
        *make_series(tmp_path / "series", 15, study_uid=study),
        *make_series(
            tmp_path / "series",
            5,
            study_uid=study,
            sop_class=MRImageStorage,
            modality="MR",
            transfer_syntax=ImplicitVRLittleEndian,
        ),
    ]
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    env = dispatch_env.start(
        {
            "orthanc": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": orthanc.dicom_port,  # an int is accepted as well as mercure's string
                "aet_target": orthanc.aet,
                "aet_source": "MERCURE",
            }
        }
    )
    assert (
        env.runtime.target("orthanc")
        .test_connection()
        .startswith(f"C-ECHO to ORTHANC@127.0.0.1:{orthanc.dicom_port} succeeded")
    )
    ref = env.job(files, "orthanc")
    ref, task = env.deliver(ref)
    assert ref.state == "success", task.dispatch_state
    assert orthanc.sop_instance_uids() == expected
    # Both series belong to the one study that Orthanc lists.
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    assert orthanc.get(f"/studies/{studies[0]}")["MainDicomTags"]["StudyInstanceUID"] == study


def test_orthanc_over_mutual_tls(
    tmp_path: Path, orthanc_tls: Any, certs: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "series", 10)
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    secure = {
        "target_type": "dicomtls",
        "ip": "127.0.0.1",
        "port": str(orthanc_tls.dicom_port),
        "aet_target": orthanc_tls.aet,
        "tls_key": str(certs.cli_key),
        "tls_cert": str(certs.cli_crt),
        "ca_cert": str(certs.ca),
    }
    env = dispatch_env.start({"secure": secure})
    assert env.runtime.target("secure").test_connection().startswith("C-ECHO over TLS to ORTHANC")
    ref = env.job(files, "secure")
    ref, task = env.deliver(ref)
    assert ref.state == "success", task.dispatch_state
    assert orthanc_tls.sop_instance_uids() == expected
