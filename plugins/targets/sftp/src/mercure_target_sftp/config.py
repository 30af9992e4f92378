"""Settings of the ``sftp`` target: mercure's fields, then this plugin's own, with defaults.

mercure's ``SftpTarget`` has ``folder``, ``user``, ``host`` and ``password`` (``null`` by
default); an existing ``mercure.json`` loads unchanged. Everything else has a default that
keeps mercure's layout (``<folder>/<task id>/`` with a ``.complete`` marker) and checks the
server's host key against the router user's ``~/.ssh/known_hosts``. The fields every SSH
target shares (login, host key, layout) come from the core's
:class:`mercure.ssh_settings.SSHFolderTargetConfig`.
"""

from __future__ import annotations

from typing import Literal

from mercure.ssh_settings import SSHFolderTargetConfig
from pydantic import Field


class SftpTargetConfig(SSHFolderTargetConfig):
    """``{"target_type": "sftp", "host": ..., "user": ..., "folder": ...}`` in mercure.json."""

    target_type: Literal["sftp"] = "sftp"
    #: Seconds to wait for the connection, the login and each SFTP request.
    timeout: float = Field(30.0, gt=0)
