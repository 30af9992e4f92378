"""Fixtures for the rsync target's tests; sshd, its test user and folders come from the core.

``settings(**overrides)`` gives the target's settings for the session's sshd
(``openssh_server``) and a fresh destination (``ssh_destination``), checked against
``ssh_known_hosts``, with key login (``key_file=None, password=...`` for a password login;
``server=`` for another sshd). The server runs on this machine, so a test looks at what
arrived with ordinary file functions.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mercure.testing import OpenSSHServer


@pytest.fixture
def remote(ssh_destination: Path) -> Path:
    return ssh_destination


@pytest.fixture
def own_server(own_openssh_server: OpenSSHServer) -> OpenSSHServer:
    return own_openssh_server


@pytest.fixture
def settings(
    openssh_server: OpenSSHServer, ssh_destination: Path, ssh_known_hosts: Path
) -> Callable[..., dict[str, Any]]:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")

    def make(*, server: OpenSSHServer | None = None, **overrides: Any) -> dict[str, Any]:
        server = server or openssh_server
        values: dict[str, Any] = {
            "target_type": "rsync",
            "host": "127.0.0.1",
            "port": server.port,
            "user": server.account.user,
            "folder": str(ssh_destination),
            "key_file": str(server.account.key),
            "known_hosts": str(ssh_known_hosts),
            **overrides,
        }
        return {k: v for k, v in values.items() if v is not None}

    return make
