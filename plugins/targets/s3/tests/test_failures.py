"""Failures that retrying cannot cure go to error/ at once, with the store's own message."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.targets import PermanentTargetError, TargetError
from mercure.testing import make_series

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import FaultProxy, SeaweedS3
    from mercure.testing import DispatchEnv

pytestmark = pytest.mark.peer


def _error_after_one_try(env: DispatchEnv, files: list[Path]) -> str:
    ref = env.job(files, "bucket")
    where, task = env.deliver(ref)
    assert where.state == "error", f"expected error/, job is in {where.state}/"
    dispatch = task.dispatch_state
    assert dispatch is not None
    assert dispatch.retries == 0  # not retried: it could never succeed as configured
    assert task.error is not None and task.error.startswith("not retried, cannot succeed")
    return task.error


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "AKIAUNKNOWN000000000"}, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_go_to_error_at_once(
    change: dict[str, str],
    code: str,
    s3_server: SeaweedS3,
    bucket: str,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "series", 5)
    env = dispatch_env.start({"bucket": {**s3_server.settings(bucket), **change}})
    error = _error_after_one_try(env, files)
    assert code in error
    assert s3_server.keys(bucket) == {}


def test_missing_bucket_goes_to_error_at_once(
    s3_server: SeaweedS3, dispatch_env: DispatchEnv, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 3)
    env = dispatch_env.start({"bucket": s3_server.settings("no-such-bucket-here")})
    error = _error_after_one_try(env, files)
    assert "NoSuchBucket" in error
    assert "The specified bucket does not exist" in error  # the store's own message


def test_access_denied_goes_to_error_at_once(
    s3_server: SeaweedS3, bucket: str, dispatch_env: DispatchEnv, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "series", 3)
    env = dispatch_env.start({"bucket": s3_server.settings(bucket, who=s3_server.reader)})
    error = _error_after_one_try(env, files)
    assert "AccessDenied" in error
    assert s3_server.keys(bucket) == {}


def test_permanent_failure_stops_the_jobs_other_uploads(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    """After the first refusal the queued uploads of the job are not sent at all."""
    files = make_series(tmp_path / "series", 40)
    settings = s3_server.settings(
        bucket, who=s3_server.reader, endpoint=fault_proxy.endpoint, parallel_uploads=2
    )
    result = make_target(settings).send(job_for(files))
    assert result.permanent
    assert not result.delivered
    assert set(result.failed) == {f.name for f in files}
    assert "AccessDenied" in str(result.error)
    assert len(fault_proxy.requests("PUT")) < 10  # not 40 refusals
    assert any(r.startswith("not sent: ") for r in result.failed.values())


def test_write_only_credentials_still_deliver(
    s3_server: SeaweedS3,
    bucket: str,
    fault_proxy: FaultProxy,
    make_target: Callable[..., Any],
    job_for: Any,
    tmp_path: Path,
) -> None:
    """Credentials that may write but not read: HEAD is refused, so nothing can be skipped,
    but every instance is delivered (once HEAD is known refused, it is not asked again)."""
    files = make_series(tmp_path / "series", 6)
    settings = s3_server.settings(
        bucket, who=s3_server.writer, endpoint=fault_proxy.endpoint, parallel_uploads=1
    )
    result = make_target(settings).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert len(s3_server.keys(bucket)) == 6
    assert [s.status for s in fault_proxy.requests("HEAD")] == [403]


def test_connection_test(s3_server: SeaweedS3, bucket: str, make_target: Any) -> None:
    ok = make_target(s3_server.settings(bucket)).test_connection()
    assert ok == (
        f"bucket {bucket} at {s3_server.endpoint} answers; credentials of the target accepted"
    )
    with pytest.raises(PermanentTargetError, match="bucket nope-nope does not exist"):
        make_target(s3_server.settings("nope-nope")).test_connection()
    wrong = {**s3_server.settings(bucket), "secret_access_key": "wrong"}
    with pytest.raises(PermanentTargetError, match="SignatureDoesNotMatch"):
        make_target(wrong).test_connection()
    unknown = {**s3_server.settings(bucket), "access_key_id": "AKIAUNKNOWN000000000"}
    with pytest.raises(PermanentTargetError, match="InvalidAccessKeyId"):
        make_target(unknown).test_connection()


def test_connection_test_of_an_unreachable_store(make_target: Any) -> None:
    from mercure.testing import free_port

    settings = {
        "target_type": "s3",
        "region": "us-east-1",
        "bucket": "b",
        "prefix": "",
        "access_key_id": "AKIAX",
        "secret_access_key": "x",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "connect_timeout": 1,
    }
    with pytest.raises(TargetError, match="cannot reach the service") as caught:
        make_target(settings).test_connection()
    assert not isinstance(caught.value, PermanentTargetError)


def test_no_credentials_anywhere_is_permanent(
    make_target: Any, job_for: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty credentials use boto3's chain; when it finds none, that is a configuration
    error, not something to retry."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from mercure.testing import free_port

    settings = {
        "target_type": "s3",
        "region": "us-east-1",
        "bucket": "b",
        "prefix": "",
        "access_key_id": "",
        "secret_access_key": "",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
    }
    files = make_series(tmp_path / "series", 2)
    result = make_target(settings).send(job_for(files))
    assert result.permanent
    assert "no usable credentials" in str(result.error)
