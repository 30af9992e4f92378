"""What an S3 failure means for a job: never going to work, the service is down, or one object.

The dispatcher moves a job to ``error/`` at once on a permanent failure (bad credentials, a
missing bucket, access denied, a wrong region) and retries the rest later. Messages carry the
service's own code and text, plus what the operator can do; they never carry credentials.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)


class Scope(enum.Enum):
    """How far a failure reaches."""

    PERMANENT = "permanent"  # the target as configured can never succeed: error/ at once
    SERVICE = "service"  # the service is down, throttling or unreachable: stop, retry later
    OBJECT = "object"  # this one object failed: the others go on, it is retried later


#: Codes that retrying cannot cure, with what to do about them.
PERMANENT_CODES: dict[str, str] = {
    "InvalidAccessKeyId": "the service does not know this access_key_id",
    "SignatureDoesNotMatch": "check secret_access_key (and region)",
    "AccessDenied": "the credentials lack the permission (s3:PutObject on the bucket and prefix)",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "AccountProblem": "the account behind these credentials has a problem",
    "NoSuchBucket": "create the bucket or correct 'bucket'",
    "InvalidBucketName": "correct 'bucket'",
    "AuthorizationHeaderMalformed": "check 'region' (the bucket lives in another region)",
    "PermanentRedirect": "check 'region' and 'endpoint_url' (the bucket lives elsewhere)",
    "IllegalLocationConstraintException": "check 'region'",
    "InvalidToken": "check session_token",
    "ExpiredToken": "the session_token has expired: give new temporary credentials",
    "TokenRefreshRequired": "the session_token has expired: give new temporary credentials",
    "InvalidSecurity": "check the credentials",
    "NotImplemented": "this store lacks a feature the target uses: try checksum MD5",
    "InvalidStorageClass": "check the bucket's storage settings",
}
#: Codes that mean the service is unwell or asks us to slow down.
SERVICE_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "OperationAborted",
        "503",
        "500",
        "502",
        "504",
    }
)


#: Codes of one request damaged on the way: worth sending again at once.
DAMAGED_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody"})


@dataclass(frozen=True)
class Failure:
    """A classified failure: its reach, the message for the task file, and whether the same
    request is worth trying again at once (throttling, 5xx, a broken connection, damaged
    bytes) rather than only on the dispatcher's next attempt."""

    scope: Scope
    message: str
    code: str = ""
    transient: bool = False


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def http_status(exc: ClientError) -> int:
    meta = exc.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode", 0) or 0)


def classify(exc: BaseException, what: str) -> Failure:
    """Classify ``exc`` raised by the request described by ``what`` (``PUT s3://b/k``)."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = http_status(exc)
        text = str(exc.response.get("Error", {}).get("Message", "") or "").strip()
        said = f"{code}: {text}" if text and text != code else (code or f"HTTP {status}")
        if code in PERMANENT_CODES:
            return Failure(
                Scope.PERMANENT, f"{what} refused: {said} ({PERMANENT_CODES[code]})", code
            )
        if code in SERVICE_CODES or status >= 500 or status == 429:
            return Failure(Scope.SERVICE, f"{what} failed: {said}; will retry", code, True)
        return Failure(Scope.OBJECT, f"{what} failed: {said}", code, code in DAMAGED_CODES)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return Failure(
            Scope.PERMANENT,
            f"{what}: no usable credentials ({exc}); set access_key_id and secret_access_key "
            "or configure boto3's chain (AWS_ACCESS_KEY_ID, ~/.aws/credentials, instance role)",
        )
    if isinstance(exc, NoRegionError):
        return Failure(Scope.PERMANENT, f"{what}: no region; set 'region'")
    if isinstance(exc, SSLError) and "certificate" in str(exc).lower():
        return Failure(
            Scope.PERMANENT,
            f"{what}: TLS certificate of the endpoint not trusted ({exc}); set AWS_CA_BUNDLE "
            "to the CA file of a private store",
        )
    if isinstance(exc, HTTPClientError | BotoConnectionError):
        return Failure(
            Scope.SERVICE, f"{what}: cannot reach the service ({exc}); will retry", transient=True
        )
    if isinstance(exc, ParamValidationError):
        return Failure(Scope.PERMANENT, f"{what}: invalid request ({exc})")
    if isinstance(exc, BotoCoreError):
        return Failure(Scope.SERVICE, f"{what}: {exc.__class__.__name__}: {exc}", transient=True)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return Failure(Scope.OBJECT, f"{what}: cannot read the file: {reason}")
    return Failure(Scope.OBJECT, f"{what}: {exc.__class__.__name__}: {exc}")
