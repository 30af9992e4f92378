"""Configuration model of the ``xnat`` target type.

mercure's fields keep their names (``project_id``, ``host``, ``user``, ``password``; all
required, as in mercure), so an existing ``mercure.json`` loads unchanged. ``host`` is the
XNAT address with its scheme (``https://xnat.example.org``, or with a path when XNAT is not
at the root); the import service is ``{host}/data/services/import``. The settings this plugin
adds all have defaults; the labels default to mercure's: subject ``PatientID``, session
``PatientID_YYYY-MM-DD`` (the study date).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from mercure.patterns import TagPattern
from mercure.secrets import Secret
from mercure.targets import TargetConfig
from pydantic import BeforeValidator, Field, PlainSerializer, field_validator

#: Fields a label pattern may use besides DICOM keywords: the study date as YYYY-MM-DD.
LABEL_FIELDS = ("StudyDateISO",)
#: What XNAT allows in IDs and labels; anything else becomes ``_``.
_NOT_IN_LABEL = re.compile(r"[^A-Za-z0-9_-]")


def _label_pattern(value: Any) -> TagPattern:
    if isinstance(value, TagPattern):
        return value
    if isinstance(value, str) and "/" in value:
        raise ValueError(f"an XNAT label pattern has no '/': {value!r}")
    return TagPattern.parse(value, allowed=LABEL_FIELDS)


LabelPattern = Annotated[
    TagPattern, BeforeValidator(_label_pattern), PlainSerializer(str, return_type=str)
]


def xnat_label(text: str) -> str:
    """``text`` as an XNAT label: letters, digits, ``_`` and ``-`` only."""
    return _NOT_IN_LABEL.sub("_", text.strip()) or "UNKNOWN"


class XnatTargetConfig(TargetConfig):
    """An XNAT project reached through the image session import service (mercure's
    ``XnatTarget``)."""

    target_type: Literal["xnat"] = "xnat"
    project_id: str
    host: str
    user: str
    password: Secret
    # Added by this project.
    #: Subject label, from tags (mercure: the PatientID).
    subject_label: LabelPattern = Field(default_factory=lambda: TagPattern.parse("{PatientID}"))
    #: Session (experiment) label, from tags (mercure: PatientID_YYYY-MM-DD of the study date).
    session_label: LabelPattern = Field(
        default_factory=lambda: TagPattern.parse("{PatientID}_{StudyDateISO}", allowed=LABEL_FIELDS)
    )
    #: XNAT's ``overwrite``: ``append`` merges into an existing session (a re-upload of the
    #: same instances changes nothing), ``delete`` replaces the session (mercure's choice: it
    #: drops series an earlier job put there), ``none`` refuses an existing session.
    overwrite: Literal["append", "delete", "none"] = "append"
    #: XNAT's ``import-handler`` for zips of DICOM files.
    import_handler: str = "DICOM-zip"
    #: Seconds to wait for XNAT's answer (an import of a large series takes a while).
    timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    #: PEM file of the CA certificates XNAT's certificate must chain to (else the system's).
    ca_bundle: str | None = None
    verify_tls: bool = True
    #: Folder for the zip while it is uploaded (default: the system's temporary folder). It
    #: needs room for the job's instances once more.
    spool_folder: str | None = None
    #: Deflate the zip (smaller upload, more CPU); DICOM pixel data is often compressed already.
    compress_zip: bool = False

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"host must be XNAT's address with its scheme, e.g. https://xnat.example.org, "
                f"not {value!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError("host must not have a query (?...) or fragment (#...)")
        return value

    @field_validator("project_id", "user")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("ca_bundle")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not Path(value).is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("spool_folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not Path(value).is_dir():
            raise ValueError(f"{value} is not a folder")
        return value
