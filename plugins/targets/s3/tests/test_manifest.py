"""The manifest: written last, only for a complete series, never twice-wrong after a break."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.testing import make_series
from pydicom import dcmread
from structlog.testing import capture_logs

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import FaultProxy, SeaweedS3
    from mercure.testing import DispatchEnv

pytestmark = pytest.mark.peer


def _manifest(s3: SeaweedS3, bucket: str, key: str) -> dict[str, Any]:
    return json.loads(s3.body(bucket, key))


def test_manifest_lists_every_object_and_comes_last(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 20)
    tags = {"SeriesInstanceUID": dcmread(files[0]).SeriesInstanceUID, "StudyInstanceUID": "1.9"}
    settings = s3_server.settings(bucket, endpoint=fault_proxy.endpoint, manifest=True)
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket", tags)
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    key = f"mercure/{ref.id}/manifest.json"
    doc = _manifest(s3_server, bucket, key)
    assert doc["format"] == "mercure-s3-manifest" and doc["version"] == 1
    assert doc["complete"] is True
    assert doc["task_id"] == ref.id and doc["target"] == "bucket" and doc["bucket"] == bucket
    assert doc["series_instance_uid"] == tags["SeriesInstanceUID"]
    assert doc["study_instance_uid"] == "1.9"
    assert doc["count"] == 20
    stored = s3_server.keys(bucket)
    assert set(stored) == {o["key"] for o in doc["objects"]} | {key}
    for entry in doc["objects"]:
        body = s3_server.body(bucket, entry["key"])
        assert entry["size"] == len(body) == stored[entry["key"]]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
        assert entry["sop_instance_uid"] == dcmread(where.path / entry["file"]).SOPInstanceUID
    assert doc["total_size"] == sum(o["size"] for o in doc["objects"])
    puts = fault_proxy.requests("PUT", 200)
    assert puts[-1].key == f"/{bucket}/{key}"  # after every instance
    assert len(puts) == 21


def test_no_manifest_while_an_instance_is_missing(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 8)
    fault_proxy.add("PUT", files[5].name, "503", times=2)
    settings = s3_server.settings(
        bucket, endpoint=fault_proxy.endpoint, manifest=True, max_attempts=2
    )
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket")
    key = f"mercure/{ref.id}/manifest.json"
    where, task = env.deliver(ref)
    assert where.state == "outgoing"
    assert key not in s3_server.keys(bucket)
    dispatch = task.dispatch_state
    assert dispatch is not None
    assert sorted(dispatch.delivered["bucket"]) == sorted(f.name for f in files if f != files[5])
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    assert _manifest(s3_server, bucket, key)["count"] == 8
    assert len(fault_proxy.requests("PUT", 200)) == 9  # nothing sent twice


def test_a_failed_manifest_keeps_the_job_open(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    """Every instance is stored but the manifest is refused: the job stays in outgoing/ with
    every instance confirmed; the retry sends no instance again and writes the manifest."""
    files = make_series(tmp_path / "series", 6)
    fault_proxy.add("PUT", "manifest.json$", "500", times=2)
    settings = s3_server.settings(
        bucket, endpoint=fault_proxy.endpoint, manifest=True, max_attempts=2
    )
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket")
    with capture_logs() as logs:
        where, task = env.deliver(ref)
    assert where.state == "outgoing"
    reasons = [
        str(e.get("reason", "")) for e in logs if e["event"] == "delivery failed; will retry"
    ]
    assert len(reasons) == 1 and "manifest not written" in reasons[0]
    assert "InternalError" in reasons[0]
    dispatch = task.dispatch_state
    assert dispatch is not None
    assert sorted(dispatch.delivered["bucket"]) == sorted(f.name for f in files)
    assert dispatch.finished == [] and dispatch.retries == 1
    assert len(s3_server.keys(bucket)) == 6  # all instances, no manifest
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    assert f"mercure/{ref.id}/manifest.json" in s3_server.keys(bucket)
    instance_puts = [s for s in fault_proxy.requests("PUT", 200) if s.key.endswith(".dcm")]
    assert len(instance_puts) == 6  # no instance sent again


def test_an_object_lost_since_its_delivery_is_restored_before_the_manifest(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 5)
    fault_proxy.add("PUT", files[4].name, "503", times=2)
    settings = s3_server.settings(
        bucket, endpoint=fault_proxy.endpoint, manifest=True, max_attempts=2
    )
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket")
    where, _ = env.deliver(ref)
    assert where.state == "outgoing"
    lost = f"mercure/{ref.id}/{files[1].name}"
    s3_server.client().delete_object(Bucket=bucket, Key=lost)
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    assert s3_server.body(bucket, lost) == files[1].read_bytes()
    doc = _manifest(s3_server, bucket, f"mercure/{ref.id}/manifest.json")
    assert sorted(o["file"] for o in doc["objects"]) == sorted(f.name for f in files)


def test_streaming_job_gets_its_manifest_only_once_complete(
    s3_server: SeaweedS3,
    bucket: str,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 12)
    batches: list[list[Path] | None] = [files[4:8], [], files[8:], None]
    seen_manifest: list[bool] = []
    confirmed: set[str] = set()
    key = "mercure/stream/manifest.json"

    def more(timeout: float) -> list[Path] | None:
        seen_manifest.append(key in s3_server.keys(bucket))
        batch = batches.pop(0)
        if batch == []:
            import time

            time.sleep(timeout)  # "nothing yet", after waiting as the dispatcher does
        return batch

    target = make_target(s3_server.settings(bucket, manifest=True))
    job = job_for(files[:4], task_id="stream", more=more, confirm=confirmed.update)
    result = target.send(job)
    assert seen_manifest == [False, False, False, False]
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert confirmed == {f.name for f in files}
    assert key not in s3_server.keys(bucket)  # the dispatcher's finish() writes it
    target.finish(job_for(files, task_id="stream"))
    assert _manifest(s3_server, bucket, key)["count"] == 12


def test_manifest_key_and_layout_from_series_tags(
    s3_server: SeaweedS3, bucket: str, make_target: Any, job_for: Any, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 3)
    series = dcmread(files[0]).SeriesInstanceUID
    study = dcmread(files[0]).StudyInstanceUID
    settings = s3_server.settings(
        bucket,
        prefix="research/ct",
        key_pattern="{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
        manifest=True,
        manifest_key="{StudyInstanceUID}/{SeriesInstanceUID}.complete.json",
    )
    job = job_for(files, tags={"SeriesInstanceUID": series, "StudyInstanceUID": study})
    target = make_target(settings)
    assert not target.send(job).failed
    target.finish(job)
    key = f"research/ct/{study}/{series}.complete.json"
    doc = _manifest(s3_server, bucket, key)
    assert {o["key"] for o in doc["objects"]} == {
        f"research/ct/{study}/{series}/{dcmread(f).SOPInstanceUID}.dcm" for f in files
    }
