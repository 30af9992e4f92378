"""Delivery to a real S3 store (SeaweedFS): keys, bytes, checksums, retries without re-uploads."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mercure.testing import make_series
from pydicom import dcmread

if TYPE_CHECKING:
    from conftest import DispatchEnv, FaultProxy, SeaweedS3

pytestmark = pytest.mark.peer


def test_job_arrives_with_mercure_layout(
    s3_server: SeaweedS3, bucket: str, dispatch_env: DispatchEnv, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 12)
    env = dispatch_env.start({"bucket": s3_server.settings(bucket)})
    ref = env.job(files, "bucket", {"SeriesInstanceUID": "1.2.3"})
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    assert sorted(s3_server.keys(bucket)) == sorted(f"mercure/{ref.id}/{f.name}" for f in files)
    client = s3_server.client()
    for f in files:
        got = client.get_object(Bucket=bucket, Key=f"mercure/{ref.id}/{f.name}")
        body = got["Body"].read()
        assert body == (where.path / f.name).read_bytes()
        assert got["ContentType"] == "application/dicom"
        assert got["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
        assert got["Metadata"]["sop-instance-uid"] == dcmread(f).SOPInstanceUID
