"""Upload one object: checksum first, skip it if it is already there, else PUT or multipart.

Every request carries a checksum of the exact bytes it sends (``x-amz-checksum-sha256`` or
``Content-MD5``), so the service refuses anything damaged on the way instead of storing it.
Each object also carries the SHA-256 of the whole file in its metadata (``x-amz-meta-sha256``):
that is what a retry compares, with the size, to tell an object that is already complete from
one that must be sent (again). A multipart upload that fails is aborted, so no parts are left
behind; one orphaned by a killed process is never visible as an object (see the README for the
lifecycle rule that removes such parts).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from botocore.exceptions import ClientError

from mercure_target_s3.config import MiB
from mercure_target_s3.errors import http_status

Checksum = Literal["SHA256", "MD5"]
DICOM_CONTENT_TYPE = "application/dicom"
METADATA_SHA256 = "sha256"
MAX_KEY_BYTES = 1024
MAX_PARTS = 10_000
_READ = MiB


@dataclass(frozen=True)
class LocalObject:
    """One file to upload under ``key``, with its size and SHA-256 (read once)."""

    path: Path
    key: str
    size: int
    sha256: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256).decode("ascii")


def describe(path: Path, key: str, metadata: Mapping[str, str] | None = None) -> LocalObject:
    """Size and SHA-256 of ``path``, read in chunks; raises ``OSError`` if it cannot be read."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ):
            digest.update(chunk)
            size += len(chunk)
    return LocalObject(path, key, size, digest.digest(), _metadata(digest, metadata))


def read_small(
    path: Path, key: str, metadata: Mapping[str, str] | None = None
) -> tuple[LocalObject, bytes]:
    """The bytes of a file small enough for one PUT, and its description (one read)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data)
    return LocalObject(path, key, len(data), digest.digest(), _metadata(digest, metadata)), data


def _metadata(digest: Any, extra: Mapping[str, str] | None) -> dict[str, str]:
    return {METADATA_SHA256: digest.hexdigest(), **(extra or {})}


def body_checksum(data: bytes, checksum: Checksum) -> dict[str, str]:
    """The request parameter that makes the service check ``data`` before storing it."""
    if checksum == "MD5":
        return {"ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode("ascii")}
    return {"ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")}


class Presence:
    """What a HEAD request found under a key."""

    SAME = "same"  # size and SHA-256 match: nothing to send
    ABSENT = "absent"  # no object, or a different one: send it
    REFUSED = "refused"  # HEAD forbidden (403): cannot tell, send it
    UNKNOWN = "unknown"  # another refusal without a reason (HEAD has no body): send it,
    # and the upload's answer will tell what is wrong


def existing(client: Any, bucket: str, obj: LocalObject) -> str:
    """Whether ``obj`` is already stored, complete, under its key.

    A refused HEAD has no body, so no reason: the upload that follows either works (the
    credentials may write but not read) or fails with the service's full message.
    Throttling, 5xx and network errors propagate.
    """
    try:
        head = client.head_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
    except ClientError as exc:
        status = http_status(exc)
        if status == 404:
            return Presence.ABSENT
        if status >= 500 or status == 429:
            raise
        return Presence.REFUSED if status == 403 else Presence.UNKNOWN
    if int(head.get("ContentLength", -1)) != obj.size:
        return Presence.ABSENT
    stored = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if stored.get(METADATA_SHA256, "").lower() == obj.sha256_hex:
        return Presence.SAME
    # Uploaded by something else in a single PUT with a SHA-256: its checksum is the file's.
    if head.get("ChecksumSHA256") == obj.sha256_b64:
        return Presence.SAME
    return Presence.ABSENT


def put(
    client: Any,
    bucket: str,
    obj: LocalObject,
    data: bytes,
    checksum: Checksum,
    content_type: str = DICOM_CONTENT_TYPE,
) -> None:
    """Upload ``obj`` (whose bytes are ``data``) in one PUT with its checksum."""
    params = body_checksum(data, "MD5") if checksum == "MD5" else {"ChecksumSHA256": obj.sha256_b64}
    client.put_object(
        Bucket=bucket,
        Key=obj.key,
        Body=data,
        ContentLength=len(data),
        ContentType=content_type,
        Metadata=dict(obj.metadata),
        **params,
    )


def put_bytes(
    client: Any, bucket: str, key: str, data: bytes, checksum: Checksum, content_type: str
) -> None:
    """Upload a small object made in memory (the manifest), with its checksum."""
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=data,
        ContentLength=len(data),
        ContentType=content_type,
        Metadata={METADATA_SHA256: hashlib.sha256(data).hexdigest()},
        **body_checksum(data, checksum),
    )


def multipart(
    client: Any,
    bucket: str,
    obj: LocalObject,
    checksum: Checksum,
    chunksize: int,
    content_type: str = DICOM_CONTENT_TYPE,
) -> None:
    """Upload ``obj`` in parts, each with its checksum; abort the upload on any failure."""
    part_size = max(chunksize, math.ceil(obj.size / MAX_PARTS / MiB) * MiB)
    create: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"} if checksum == "SHA256" else {}
    upload_id = client.create_multipart_upload(
        Bucket=bucket,
        Key=obj.key,
        ContentType=content_type,
        Metadata=dict(obj.metadata),
        **create,
    )["UploadId"]
    try:
        with open(obj.path, "rb") as fh:
            parts = _upload_parts(client, bucket, obj, upload_id, fh, part_size, checksum)
        client.complete_multipart_upload(
            Bucket=bucket, Key=obj.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        # The service may be gone; the parts of an upload never show as an object.
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=obj.key, UploadId=upload_id)
        raise


def _upload_parts(
    client: Any,
    bucket: str,
    obj: LocalObject,
    upload_id: str,
    fh: BinaryIO,
    part_size: int,
    checksum: Checksum,
) -> list[dict[str, Any]]:
    whole = hashlib.sha256()
    parts: list[dict[str, Any]] = []
    number = 0
    while data := fh.read(part_size):
        number += 1
        whole.update(data)
        params = body_checksum(data, checksum)
        answer = client.upload_part(
            Bucket=bucket,
            Key=obj.key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ContentLength=len(data),
            **params,
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
        if "ChecksumSHA256" in params:
            part["ChecksumSHA256"] = answer.get("ChecksumSHA256") or params["ChecksumSHA256"]
        parts.append(part)
    if whole.digest() != obj.sha256:
        raise OSError(f"{obj.path.name} changed while it was uploaded")
    return parts
