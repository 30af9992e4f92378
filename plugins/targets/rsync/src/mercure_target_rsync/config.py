"""Settings of the ``rsync`` target: mercure's fields, then this plugin's own, with defaults.

mercure's ``RsyncTarget`` has ``folder``, ``user``, ``host``, ``password`` (``null`` by
default) and ``run_on_complete`` (``false``); an existing ``mercure.json`` loads unchanged.
Everything else has a default that keeps mercure's layout (``<folder>/<task id>/`` with a
``.complete`` marker) and checks the server's host key against the router user's
``~/.ssh/known_hosts``.
"""

from __future__ import annotations

import re
from typing import Literal

from mercure.patterns import TagPattern, TagPatternField
from mercure.secrets import OptionalSecret
from mercure.targets import TargetConfig
from pydantic import Field, field_validator, model_validator

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
#: Fields that differ between the instances of one job: not usable for the job's folder.
PER_INSTANCE = frozenset({"filename", "SOPInstanceUID", "InstanceNumber"})


def check_fingerprint(value: str | None) -> str | None:
    """``SHA256:<43 base64 characters>``, as ``ssh-keygen -lf`` and ``ssh`` print it."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not FINGERPRINT.match(value):
        raise ValueError(
            f"host_key_fingerprint {value!r} is not an OpenSSH SHA256 fingerprint such as "
            "'SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8'; get it with "
            "`ssh-keyscan -p PORT HOST | ssh-keygen -lf -` and check it with the server's admin"
        )
    return value.rstrip("=")


def check_file_pattern(pattern: TagPattern) -> TagPattern:
    """Each instance needs a name of its own, visible to readers (no hidden components)."""
    if not {"filename", "SOPInstanceUID"} & set(pattern.fields):
        raise ValueError(
            f"file_pattern {pattern.text!r} must contain {{filename}} or {{SOPInstanceUID}}, "
            "or instances of one series would overwrite each other"
        )
    if any(part.startswith(".") for part in pattern.text.split("/")):
        raise ValueError(f"file_pattern {pattern.text!r}: names starting with '.' are hidden")
    return pattern


def check_folder_pattern(pattern: TagPattern) -> TagPattern:
    """The job's folder comes from the series' tags, the same for every instance of the job."""
    used = PER_INSTANCE & set(pattern.fields)
    if used:
        raise ValueError(
            f"folder_pattern {pattern.text!r} uses {', '.join(sorted(used))}, which differs "
            "between the instances of a job; use series-level tags and {task_id}"
        )
    if any(part.startswith(".") for part in pattern.text.split("/")):
        raise ValueError(f"folder_pattern {pattern.text!r}: names starting with '.' are hidden")
    return pattern


class RsyncTargetConfig(TargetConfig):
    """``{"target_type": "rsync", "host": ..., "user": ..., "folder": ...}`` in mercure.json."""

    target_type: Literal["rsync"] = "rsync"
    # -- mercure's fields ----------------------------------------------------------------------
    #: Folder on the server below which each job gets a folder of its own; it must exist.
    #: Relative paths are relative to the account's login folder.
    folder: str = Field(min_length=1)
    user: str = Field(min_length=1)
    host: str = Field(min_length=1)
    #: Password of ``user``; plaintext, ``${env:NAME}`` or ``${file:/path}``. Handed to ssh
    #: through SSH_ASKPASS and a private socket, never on a command line or in the environment.
    password: OptionalSecret = None
    #: After the series is complete, run ``<folder>/mercure_complete.sh <series folder> rsync``
    #: on the server (plus the target's name and the task id as third and fourth argument).
    run_on_complete: bool = False
    # -- this plugin's settings ----------------------------------------------------------------
    port: int = Field(22, ge=1, le=65535)
    #: Private key file (OpenSSH or PEM format) for public-key login.
    key_file: str | None = None
    #: The private key itself, for secret stores: ``${file:/run/secrets/key}``, ``${env:KEY}``.
    #: ssh needs a file: it is written, readable by the router's user only, into a private
    #: temporary folder for the duration of one job.
    private_key: OptionalSecret = None
    #: Passphrase of ``key_file`` / ``private_key``.
    key_passphrase: OptionalSecret = None
    #: known_hosts file to check the server's host key against; empty: ``~/.ssh/known_hosts``
    #: and ``/etc/ssh/ssh_known_hosts`` of the user running the router.
    known_hosts: str | None = None
    #: Pin the server's host key by its fingerprint instead (``SHA256:...``).
    host_key_fingerprint: str | None = None
    #: Accept a server whose key is not known yet and pin it in ``known_hosts``. Off: an
    #: unknown server is refused with its fingerprint in the error.
    trust_on_first_use: bool = False
    #: The job's folder below ``folder`` (series-level tags, ``{task_id}``, ``{target}``).
    folder_pattern: TagPatternField = Field(default_factory=lambda: TagPattern.parse("{task_id}"))
    #: Each instance's path inside the job's folder.
    file_pattern: TagPatternField = Field(default_factory=lambda: TagPattern.parse("{filename}"))
    #: Seconds to wait for the connection and login, and the longest pause in a transfer
    #: (rsync's ``--timeout``) before the try is given up and retried.
    timeout: int = Field(60, ge=5)
    #: Permissions of the files and folders created (rsync's ``--chmod``); mercure used 660.
    chmod: str = "D770,F660"
    #: Compress data on the wire (rsync's ``-z``, as mercure did).
    compress: bool = True
    #: The local programs (a name looked up on PATH, or a path).
    rsync_path: str = "rsync"
    ssh_path: str = "ssh"

    @field_validator("host_key_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        return check_fingerprint(value)

    @field_validator("file_pattern")
    @classmethod
    def _file_pattern(cls, value: TagPattern) -> TagPattern:
        return check_file_pattern(value)

    @field_validator("folder_pattern")
    @classmethod
    def _folder_pattern(cls, value: TagPattern) -> TagPattern:
        return check_folder_pattern(value)

    @field_validator("chmod")
    @classmethod
    def _chmod(cls, value: str) -> str:
        if not re.fullmatch(r"[DF]?[0-7]{3,4}(,[DF]?[0-7]{3,4})*|([DFugoa+=,rwxXst-]+)", value):
            raise ValueError(f"chmod {value!r} is not an rsync --chmod value such as 'D770,F660'")
        return value

    @field_validator("host", "user")
    @classmethod
    def _no_option(cls, value: str) -> str:
        if value.startswith("-") or any(c.isspace() for c in value) or "@" in value:
            raise ValueError(f"{value!r} is not a plain host or user name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RsyncTargetConfig:
        if self.key_file and self.private_key:
            raise ValueError("set key_file or private_key, not both")
        if self.host_key_fingerprint and self.trust_on_first_use:
            raise ValueError(
                "host_key_fingerprint pins the key already; trust_on_first_use cannot be combined"
            )
        if self.key_passphrase and not (self.key_file or self.private_key):
            raise ValueError("key_passphrase is set but there is no key_file or private_key")
        return self
