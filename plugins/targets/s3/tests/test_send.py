"""Delivery to a real S3 store (SeaweedFS): keys, bytes, checksums, retries without re-uploads."""

from __future__ import annotations

import base64
import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.testing import make_series
from mercure_target_s3.errors import Scope, classify
from mercure_target_s3.upload import LocalObject, multipart, put
from pydicom import dcmread

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import FaultProxy, SeaweedS3
    from mercure.testing import DispatchEnv

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


def test_key_pattern_from_the_instances_tags(
    s3_server: SeaweedS3, bucket: str, make_target: Callable[..., Any], job_for: Any, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 5)
    pattern = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    target = make_target(s3_server.settings(bucket, prefix="", key_pattern=pattern))
    result = target.send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    expected = set()
    for f in files:
        ds = dcmread(f)
        expected.add(
            f"MRN0001/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        )
    assert set(s3_server.keys(bucket)) == expected


def test_retry_sends_nothing_already_complete(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 10)
    target = make_target(s3_server.settings(bucket, endpoint=fault_proxy.endpoint))
    job = job_for(files)
    assert sorted(target.send(job).delivered) == sorted(f.name for f in files)
    assert len(fault_proxy.requests("PUT", 200)) == 10
    # The same files again (a retry after a lost record): HEAD finds each one complete.
    again = target.send(job)
    assert sorted(again.delivered) == sorted(f.name for f in files)
    assert len(fault_proxy.requests("PUT")) == 10
    assert len(fault_proxy.requests("HEAD", 200)) == 10


def test_changed_object_is_uploaded_again(
    s3_server: SeaweedS3, bucket: str, make_target: Callable[..., Any], job_for: Any, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 3)
    target = make_target(s3_server.settings(bucket))
    job = job_for(files, task_id="t1")
    target.send(job)
    key = f"mercure/t1/{files[0].name}"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"not the instance")
    result = target.send(job)
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert s3_server.body(bucket, key) == files[0].read_bytes()


def test_answer_lost_after_store_is_not_uploaded_twice(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    """The store keeps the object but the connection breaks before the answer: the next try
    asks with HEAD first and finds it complete."""
    files = make_series(tmp_path / "series", 6)
    fault_proxy.add("PUT", files[2].name, "lose")
    target = make_target(s3_server.settings(bucket, endpoint=fault_proxy.endpoint))
    result = target.send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    puts = [s for s in fault_proxy.requests("PUT") if s.key.endswith(files[2].name)]
    assert [s.status for s in puts] == ["lost-200"]
    assert len(s3_server.keys(bucket)) == 6


@pytest.mark.parametrize("action", ["503", "500", "drop"])
def test_passing_failures_are_tried_again(
    action: str,
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 4)
    fault_proxy.add("PUT", files[1].name, action, times=2)
    target = make_target(s3_server.settings(bucket, endpoint=fault_proxy.endpoint))
    result = target.send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert not result.failed
    tries = [s.status for s in fault_proxy.requests("PUT") if s.key.endswith(files[1].name)]
    broken = "dropped" if action == "drop" else f"injected-{action}"
    assert tries == [broken, broken, 200]


def test_bytes_damaged_on_the_way_are_refused_and_sent_again(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 3)
    fault_proxy.add("PUT", files[0].name, "corrupt")
    target = make_target(s3_server.settings(bucket, endpoint=fault_proxy.endpoint))
    result = target.send(job_for(files, task_id="c"))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    tries = [s.status for s in fault_proxy.requests("PUT") if s.key.endswith(files[0].name)]
    assert tries == [400, 200]  # refused by the store (the damage is seen), then stored
    assert s3_server.body(bucket, f"mercure/c/{files[0].name}") == files[0].read_bytes()


def test_throttling_that_lasts_fails_the_attempt_for_a_retry(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 5)
    fault_proxy.add("PUT", files[3].name, "503", times=2)
    settings = s3_server.settings(bucket, endpoint=fault_proxy.endpoint, max_attempts=2)
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket")
    where, task = env.deliver(ref)
    assert where.state == "outgoing"  # to be retried, not in error/
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.retries == 1
    (reason,) = dispatch.failed["bucket"].values()
    assert "SlowDown" in reason
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    tries = [s.status for s in fault_proxy.requests("PUT") if s.key.endswith(files[3].name)]
    assert tries == ["injected-503", "injected-503", 200]
    assert len(fault_proxy.requests("PUT", 200)) == 5  # the other four were not sent again


def test_store_unreachable_is_retried_later(
    make_target: Callable[..., Any], job_for: Any, tmp_path: Path, dispatch_env: DispatchEnv
) -> None:
    from mercure.testing import free_port

    files = make_series(tmp_path / "series", 3)
    settings = {
        "target_type": "s3",
        "region": "us-east-1",
        "bucket": "b",
        "prefix": "",
        "access_key_id": "AKIAX",
        "secret_access_key": "x",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "connect_timeout": 1,
        "max_attempts": 2,
    }
    env = dispatch_env.start({"bucket": settings})
    ref = env.job(files, "bucket")
    where, task = env.deliver(ref)
    assert where.state == "outgoing"
    assert task.dispatch_state is not None and task.dispatch_state.retries == 1
    assert "cannot reach the service" in str(task.dispatch_state.attempts[-1].error)


def test_uploads_in_flight_are_bounded_across_jobs(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    """Three dispatcher threads send at once through one target: never more than
    ``parallel_uploads`` requests reach the store together, and every object arrives."""
    target = make_target(
        s3_server.settings(bucket, endpoint=fault_proxy.endpoint, parallel_uploads=3)
    )
    jobs = [job_for(make_series(tmp_path / f"s{i}", 15), task_id=f"job{i}") for i in range(3)]
    results: dict[str, Any] = {}

    def send(job: Any) -> None:
        results[job.task_id] = target.send(job)

    threads = [threading.Thread(target=send, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for job in jobs:
        assert sorted(results[job.task_id].delivered) == sorted(f.name for f in job.files)
    assert len(s3_server.keys(bucket)) == 45
    assert 1 <= fault_proxy.max_in_flight <= 3


def test_multipart_above_the_threshold(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    big = make_series(tmp_path / "big", 1, rows=1700, columns=1700)[0]
    small = make_series(tmp_path / "big", 2)
    assert big.stat().st_size > 5 * 1024 * 1024
    settings = s3_server.settings(
        bucket,
        endpoint=fault_proxy.endpoint,
        multipart_threshold=5 * 1024 * 1024,
        multipart_chunksize=5 * 1024 * 1024,
    )
    target = make_target(settings)
    result = target.send(job_for([big, *small], task_id="mp"))
    assert sorted(result.delivered) == sorted(p.name for p in [big, *small])
    key = f"mercure/mp/{big.name}"
    assert s3_server.body(bucket, key) == big.read_bytes()
    head = s3_server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-2")  # two parts
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    parts = [s for s in fault_proxy.requests("PUT") if "partNumber=" in s.query]
    assert len(parts) == 2
    # Small files are single PUTs.
    assert len([s for s in fault_proxy.requests("PUT") if "partNumber=" not in s.query]) == 2


@pytest.mark.parametrize("checksum", ["SHA256", "MD5"])
def test_every_request_carries_the_checksum_of_its_bytes(
    checksum: str,
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    big = make_series(tmp_path / "s", 1, rows=1700, columns=1700)[0]
    files = [big, *make_series(tmp_path / "s", 3)]
    settings = s3_server.settings(
        bucket,
        endpoint=fault_proxy.endpoint,
        checksum=checksum.lower(),
        multipart_threshold=5 * 1024 * 1024,
        multipart_chunksize=5 * 1024 * 1024,
        manifest=True,
    )
    target, job = make_target(settings), job_for(files)
    result = target.send(job)
    assert sorted(result.delivered) == sorted(f.name for f in files)
    target.finish(job)
    puts = fault_proxy.requests("PUT", 200)
    assert len(puts) == 3 + 2 + 1  # three small PUTs, two parts, the manifest
    for seen in puts:
        if checksum == "SHA256":
            digest = hashlib.sha256(seen.body).digest()
            assert seen.headers["x-amz-checksum-sha256"] == base64.b64encode(digest).decode()
        else:
            digest = hashlib.md5(seen.body).digest()
            assert seen.headers["content-md5"] == base64.b64encode(digest).decode()


@pytest.mark.parametrize("checksum", ["SHA256", "MD5"])
def test_the_store_refuses_bytes_that_do_not_match_their_checksum(
    checksum: str,
    s3_server: SeaweedS3,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store checks the checksum each request carries: given the checksum of other bytes
    it refuses the PUT and the part (BadDigest), and nothing is stored."""
    from mercure_target_s3 import upload

    real = upload.body_checksum
    monkeypatch.setattr(upload, "body_checksum", lambda data, algo: real(data + b"!", algo))
    client = s3_server.client()
    small = tmp_path / "small.dcm"
    small.write_bytes(b"DICM" * 2000)
    obj, data = upload.read_small(small, "bad/small.dcm")
    if checksum == "SHA256":  # a single PUT sends the file's own SHA-256
        obj = LocalObject(small, obj.key, obj.size, hashlib.sha256(b"other").digest(), {})
    with pytest.raises(Exception) as refused:
        put(client, bucket, obj, data, checksum)  # type: ignore[arg-type]
    failure = classify(refused.value, "PUT")
    assert failure.scope is Scope.OBJECT
    assert "BadDigest" in failure.message
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\x01" * (6 * 1024 * 1024))
    obj = upload.describe(big, "bad/big.dcm")
    with pytest.raises(Exception) as refused:
        multipart(client, bucket, obj, checksum, 5 * 1024 * 1024)  # type: ignore[arg-type]
    assert "BadDigest" in classify(refused.value, "UploadPart").message
    assert s3_server.keys(bucket, "bad/") == {}
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted
