"""Settings of the ``rsync`` target: mercure's fields, then this plugin's own, with defaults.

mercure's ``RsyncTarget`` has ``folder``, ``user``, ``host``, ``password`` (``null`` by
default) and ``run_on_complete`` (``false``); an existing ``mercure.json`` loads unchanged.
Everything else has a default that keeps mercure's layout (``<folder>/<task id>/`` with a
``.complete`` marker) and checks the server's host key against the router user's
``~/.ssh/known_hosts``. The fields every SSH target shares (login, host key, layout) come
from the core's :class:`mercure.ssh_settings.SSHFolderTargetConfig`; for ssh, the
``password`` is handed over through SSH_ASKPASS and a private socket, never on a command line
or in the environment, and a ``private_key`` is written, readable by the router's user only,
into a private temporary folder for the duration of one job.
"""

from __future__ import annotations

import re
from typing import Literal

from mercure.ssh_settings import SSHFolderTargetConfig
from pydantic import Field, field_validator


class RsyncTargetConfig(SSHFolderTargetConfig):
    """``{"target_type": "rsync", "host": ..., "user": ..., "folder": ...}`` in mercure.json."""

    target_type: Literal["rsync"] = "rsync"
    # -- mercure's field -----------------------------------------------------------------------
    #: After the series is complete, run ``<folder>/mercure_complete.sh <series folder> rsync``
    #: on the server (plus the target's name and the task id as third and fourth argument).
    run_on_complete: bool = False
    # -- this plugin's settings ----------------------------------------------------------------
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

    @field_validator("chmod")
    @classmethod
    def _chmod(cls, value: str) -> str:
        if not re.fullmatch(r"[DF]?[0-7]{3,4}(,[DF]?[0-7]{3,4})*|([DFugoa+=,rwxXst-]+)", value):
            raise ValueError(f"chmod {value!r} is not an rsync --chmod value such as 'D770,F660'")
        return value

    @field_validator("host", "user")
    @classmethod
    def _no_option(cls, value: str) -> str:
        """ssh would take a leading ``-`` as an option, and ``@`` or a space as syntax."""
        if value.startswith("-") or any(c.isspace() for c in value) or "@" in value:
            raise ValueError(f"{value!r} is not a plain host or user name")
        return value
