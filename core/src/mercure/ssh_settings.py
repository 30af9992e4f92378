"""Settings of a target that delivers into a folder on a server reached over SSH.

mercure's SSH-based targets (``sftp``, ``rsync``) have ``folder``, ``user``, ``host`` and
``password`` (``null`` by default); :class:`SSHFolderTargetConfig` declares them with the
same names and defaults, so an existing ``mercure.json`` loads unchanged, and adds what
every such target needs beyond them, each with a default: how to log in (port, key file or
key, passphrase), how the server's host key is checked (the router user's
``~/.ssh/known_hosts`` by default, or a pinned fingerprint, or trust on first use), and the
layout of :mod:`mercure.remote_layout` (``folder_pattern``, ``file_pattern``). A plugin
subclasses it with its ``target_type`` literal, its timeout and its own settings. Pure
pydantic: how a connection is made is the plugin's business.
"""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, field_validator, model_validator

from mercure.patterns import TagPattern, TagPatternField
from mercure.remote_layout import check_file_pattern, check_folder_pattern
from mercure.secrets import OptionalSecret
from mercure.targets import TargetConfig

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")


def check_fingerprint(value: str | None) -> str | None:
    """``SHA256:<43 base64 characters>``, as ``ssh-keygen -lf`` and ``ssh`` print it.

    Blank means none; the trailing ``=`` some tools print is dropped, as OpenSSH does.
    """
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


class SSHFolderTargetConfig(TargetConfig):
    """mercure's fields of an SSH target, then the login, host-key and layout settings."""

    # -- mercure's fields ----------------------------------------------------------------------
    #: Folder on the server below which each job gets a folder of its own; it must exist.
    #: Relative paths are relative to the account's login folder.
    folder: str = Field(min_length=1)
    user: str = Field(min_length=1)
    host: str = Field(min_length=1)
    #: Password of ``user``; plaintext, ``${env:NAME}`` or ``${file:/path}``.
    password: OptionalSecret = None
    # -- login and host key --------------------------------------------------------------------
    port: int = Field(22, ge=1, le=65535)
    #: Private key file (OpenSSH or PEM format) for public-key login.
    key_file: str | None = None
    #: The private key itself, for secret stores: ``${file:/run/secrets/key}``, ``${env:KEY}``.
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
    # -- layout (mercure.remote_layout) ----------------------------------------------------------
    #: The job's folder below ``folder`` (series-level tags, ``{task_id}``, ``{target}``).
    folder_pattern: TagPatternField = Field(default_factory=lambda: TagPattern.parse("{task_id}"))
    #: Each instance's path inside the job's folder.
    file_pattern: TagPatternField = Field(default_factory=lambda: TagPattern.parse("{filename}"))

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

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.key_file and self.private_key:
            raise ValueError("set key_file or private_key, not both")
        if self.host_key_fingerprint and self.trust_on_first_use:
            raise ValueError(
                "host_key_fingerprint pins the key already; trust_on_first_use cannot be combined"
            )
        if self.key_passphrase and not (self.key_file or self.private_key):
            raise ValueError("key_passphrase is set but there is no key_file or private_key")
        return self


__all__ = ["FINGERPRINT", "SSHFolderTargetConfig", "check_fingerprint"]
