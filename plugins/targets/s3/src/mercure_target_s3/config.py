"""Configuration model of the ``s3`` target type.

mercure's fields (``region``, ``bucket``, ``prefix``, ``access_key_id``, ``secret_access_key``)
keep their names and stay required, as in mercure, so an existing ``mercure.json`` loads
unchanged. Empty credentials mean boto3's own chain (environment, shared files, instance role).
Everything this plugin adds has a default that keeps mercure's behaviour: objects at
``<prefix>/<task id>/<file name>``, no manifest.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from mercure.patterns import TagPattern, TagPatternField
from mercure.secrets import OptionalSecret, Secret
from mercure.targets import TargetConfig
from pydantic import Field, field_validator, model_validator

MiB = 1024 * 1024
#: S3's smallest part (all parts but the last) and largest single PUT.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
#: Keys that name one instance each: without one of them every instance would get one key.
INSTANCE_FIELDS = ("filename", "SOPInstanceUID")


class S3TargetConfig(TargetConfig):
    """A bucket of Amazon S3 or of an S3-compatible store (mercure's ``S3Target``)."""

    target_type: Literal["s3"] = "s3"
    region: str
    bucket: str
    prefix: str
    access_key_id: Secret
    secret_access_key: Secret
    # Added by this project.
    #: Temporary credentials (STS) come with a session token.
    session_token: OptionalSecret = None
    #: For S3-compatible stores (MinIO, Ceph, SeaweedFS, ...); empty: Amazon S3 of ``region``.
    endpoint_url: str | None = None
    #: ``auto``: path-style URLs with ``endpoint_url`` (what on-premises stores expect),
    #: virtual-hosted style on Amazon S3.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    #: Key of each instance below ``prefix``: DICOM keywords of the instance, ``task_id``,
    #: ``filename``, ``target``. The default is mercure's layout.
    key_pattern: TagPatternField = TagPattern.parse("{task_id}/{filename}")
    #: Uploads in flight at once for this target, shared by all jobs sent to it.
    parallel_uploads: int = Field(default=8, ge=1, le=64)
    #: Files of this size (bytes) or larger are sent as multipart uploads.
    multipart_threshold: int = Field(default=16 * MiB, ge=MIN_PART)
    #: Part size (bytes) of a multipart upload.
    multipart_chunksize: int = Field(default=16 * MiB, ge=MIN_PART, le=MAX_PART)
    #: Checksum sent with every object and part, checked by the service before it stores
    #: them: ``SHA256`` (x-amz-checksum-sha256) or ``MD5`` (Content-MD5, for older stores).
    checksum: Literal["SHA256", "MD5"] = "SHA256"
    #: Before uploading, look for the object: one already there with the same size and
    #: SHA-256 is not uploaded again (a retry after a broken transfer re-sends nothing).
    skip_existing: bool = True
    #: After the last instance of a job, write a manifest object that lists every key with
    #: its size and SHA-256: readers that wait for it never see a partial series.
    manifest: bool = False
    #: Key of the manifest below ``prefix``; series-level tags, ``task_id`` and ``target``.
    manifest_key: TagPatternField = TagPattern.parse("{task_id}/manifest.json")
    #: Seconds to wait for a connection, and for an answer, per request.
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    #: Tries per object within one delivery attempt (throttling, 5xx, broken connections),
    #: with a growing pause, before the job's attempt fails and the dispatcher retries it.
    max_attempts: int = Field(default=4, ge=1, le=20)

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("bucket must name the bucket to upload into")
        if "/" in value or any(c.isspace() for c in value):
            raise ValueError(
                f"bucket {value!r} must be a bucket name only: put folders into 'prefix'"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        parts = [p for p in value.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"prefix {value!r} must not contain '.' or '..' folders")
        return "/".join(parts)

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _check_endpoint(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            return value
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"endpoint_url {value!r} must be an http:// or https:// URL such as "
                "https://s3.example.org:9000"
            )
        return value

    @field_validator("region")
    @classmethod
    def _strip_region(cls, value: str) -> str:
        return value.strip()

    @field_validator("checksum", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("key_pattern")
    @classmethod
    def _check_key_pattern(cls, value: TagPattern) -> TagPattern:
        if not any(f in value.fields for f in INSTANCE_FIELDS):
            raise ValueError(
                f"key_pattern {value.text!r} must contain {{filename}} or {{SOPInstanceUID}}, "
                "or every instance of a series would get the same key"
            )
        return value

    @field_validator("manifest_key")
    @classmethod
    def _check_manifest_key(cls, value: TagPattern) -> TagPattern:
        used = [f for f in INSTANCE_FIELDS if f in value.fields]
        if used:
            raise ValueError(
                f"manifest_key {value.text!r} names one object per job: it cannot use "
                f"{{{used[0]}}}, which differs per instance"
            )
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> S3TargetConfig:
        if bool(self.access_key_id.strip()) != bool(self.secret_access_key.strip()):
            raise ValueError(
                "give both access_key_id and secret_access_key, or leave both empty to use "
                "boto3's credential chain (environment, ~/.aws, instance role)"
            )
        if self.session_token and not self.access_key_id.strip():
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self

    def object_key(self, relative: str) -> str:
        """The full key of ``relative`` (a rendered pattern) below ``prefix``."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def uses_chain(self) -> bool:
        """True when credentials come from boto3's chain rather than from the target."""
        return not self.access_key_id.strip()
