"""Configuration model of the ``dicomweb`` target type.

mercure's fields keep their names and defaults (``url``, ``qido_url_prefix``,
``wado_url_prefix``, ``stow_url_prefix``, ``access_token``, ``http_user``, ``http_password``),
so an existing ``mercure.json`` loads unchanged. As in mercure, each service's URL is ``url``
followed by its prefix, if any: STOW-RS posts to ``{url}/{stow_url_prefix}/studies``. The
settings this plugin adds all have defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from mercure.secrets import OptionalSecret
from mercure.targets import TargetConfig
from pydantic import Field, field_validator, model_validator

DEFAULT_BATCH_INSTANCES = 50
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024


class DicomWebTargetConfig(TargetConfig):
    """A DICOMweb archive reached with STOW-RS (mercure's ``DicomWebTarget``)."""

    target_type: Literal["dicomweb"] = "dicomweb"
    url: str
    qido_url_prefix: str | None = None
    wado_url_prefix: str | None = None
    stow_url_prefix: str | None = None
    access_token: OptionalSecret = None
    http_user: str | None = None
    http_password: OptionalSecret = None
    # Added by this project.
    #: Most instances in one STOW-RS request.
    batch_max_instances: int = Field(default=DEFAULT_BATCH_INSTANCES, ge=1, le=10_000)
    #: Most bytes of instance files in one request (an instance larger than this goes alone).
    batch_max_bytes: int = Field(default=DEFAULT_BATCH_BYTES, ge=1)
    #: Seconds to wait for the server's answer (and between bytes while sending).
    timeout: float = Field(default=120.0, gt=0)
    #: Seconds to wait for a connection to open.
    connect_timeout: float = Field(default=10.0, gt=0)
    #: PEM file of the CA certificates the server's certificate must chain to (else the
    #: system's trust store).
    ca_bundle: str | None = None
    #: Check the server's certificate (turn off only for a test server).
    verify_tls: bool = True
    #: PEM client certificate (and its key, unless the certificate file holds it too).
    client_cert: str | None = None
    client_key: str | None = None
    client_key_password: OptionalSecret = None
    #: Longest ``Retry-After`` (s) honoured by waiting within one delivery attempt; a longer
    #: one ends the attempt and the job is retried with the dispatcher's backoff, not before.
    retry_after_max_wait: float = Field(default=30.0, ge=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme == "file":
            raise ValueError(
                "file:// DICOMweb targets (a local folder served by dicomweb-client) are not "
                "supported by mercure-target-dicomweb; use a 'folder' target instead"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"url must be an http:// or https:// URL of the DICOMweb service, not {value!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError("url must not have a query (?...) or fragment (#...)")
        return value.rstrip("/")

    @field_validator("qido_url_prefix", "wado_url_prefix", "stow_url_prefix", mode="before")
    @classmethod
    def _check_prefix(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().strip("/")
            if not value:
                return None  # mercure's web interface stores an empty prefix as null
            if "?" in value or "#" in value or "//" in value:
                raise ValueError(f"a URL prefix is a path such as 'dicom-web', not {value!r}")
        return value

    @field_validator("http_user", "access_token", "http_password", mode="after")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value if value else None

    @field_validator("ca_bundle", "client_cert", "client_key")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if not value:
            return None
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{value} is not a readable file")
        return str(path)

    @model_validator(mode="after")
    def _check_auth(self) -> DicomWebTargetConfig:
        if self.http_user and not self.http_password:
            raise ValueError("http_user is set but http_password is empty: set both, or neither")
        if self.http_password and not self.http_user:
            raise ValueError("http_password is set but http_user is empty: set both, or neither")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key is set but client_cert is empty: set the certificate")
        return self

    def service_url(self, prefix: str | None) -> str:
        """``url`` followed by a service's prefix, as mercure (dicomweb-client) builds it."""
        return f"{self.url}/{prefix}" if prefix else self.url

    @property
    def stow_url(self) -> str:
        return self.service_url(self.stow_url_prefix) + "/studies"

    @property
    def qido_base(self) -> str:
        return self.service_url(self.qido_url_prefix)

    @property
    def wado_base(self) -> str:
        return self.service_url(self.wado_url_prefix)

    @property
    def auth_kind(self) -> str:
        """Which credentials are sent: basic wins over the token, as in mercure."""
        if self.http_user:
            return "basic"
        if self.access_token:
            return "bearer"
        return "none"
