"""How S3 failures are classified: permanent for the job, the service's, or one object's."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from mercure_target_s3.errors import Scope, classify


def client_error(code: str, status: int, message: str = "told by the store") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "hint"),
    [
        ("SignatureDoesNotMatch", 403, "check secret_access_key"),
        ("InvalidAccessKeyId", 403, "does not know this access_key_id"),
        ("AccessDenied", 403, "s3:PutObject"),
        ("NoSuchBucket", 404, "create the bucket"),
        ("AuthorizationHeaderMalformed", 400, "check 'region'"),
        ("PermanentRedirect", 301, "check 'region'"),
        ("ExpiredToken", 400, "session_token has expired"),
    ],
)
def test_permanent(code: str, status: int, hint: str) -> None:
    failure = classify(client_error(code, status), "upload of x to s3://b/k")
    assert failure.scope is Scope.PERMANENT and not failure.transient
    assert failure.message.startswith(f"upload of x to s3://b/k refused: {code}: told by")
    assert hint in failure.message


@pytest.mark.parametrize(
    ("code", "status"),
    [("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503), ("Other", 502),
     ("TooManyRequests", 429), ("RequestTimeout", 400)],
)  # fmt: skip
def test_service(code: str, status: int) -> None:
    failure = classify(client_error(code, status), "PUT")
    assert failure.scope is Scope.SERVICE and failure.transient
    assert "will retry" in failure.message


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ],
)
def test_network(exc: Exception) -> None:
    failure = classify(exc, "PUT")
    assert failure.scope is Scope.SERVICE and failure.transient
    assert "cannot reach the service" in failure.message


def test_one_object() -> None:
    damaged = classify(client_error("BadDigest", 400), "PUT")
    assert damaged.scope is Scope.OBJECT and damaged.transient
    refused = classify(client_error("EntityTooLarge", 400), "PUT")
    assert refused.scope is Scope.OBJECT and not refused.transient
    unreadable = classify(FileNotFoundError(2, "No such file or directory"), "PUT")
    assert unreadable.scope is Scope.OBJECT
    assert "cannot read the file: No such file or directory" in unreadable.message


def test_no_credentials() -> None:
    failure = classify(NoCredentialsError(), "PUT")
    assert failure.scope is Scope.PERMANENT
    assert "no usable credentials" in failure.message
