"""Fixtures for the sftp target's tests; the sshd and its test user come from mercure.testing.

* ``known_hosts``: a known_hosts file that trusts the session's sshd.
* ``remote``: a fresh destination folder owned by the test user (the server runs locally, so
  a test looks at what arrived with ordinary file functions).
* ``own_server``: an sshd of the test's own, to kill or re-key without disturbing others.
* ``settings``: ``settings(**overrides)`` gives the target's settings for that server and
  folder, key login by default (``key_file=None, password=...`` for a password login).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mercure.testing import OpenSSHServer, SSHAccount


@pytest.fixture
def known_hosts(openssh_server: OpenSSHServer, tmp_path: Path) -> Path:
    return openssh_server.write_known_hosts(tmp_path / "known_hosts")


@pytest.fixture
def remote(ssh_account: SSHAccount) -> Path:
    return ssh_account.folder(f"dest-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def own_server(ssh_account: SSHAccount) -> Iterator[OpenSSHServer]:
    server = OpenSSHServer(ssh_account, ssh_account.home.parent / f"sshd-{uuid.uuid4().hex[:8]}")
    server.start()
    yield server
    server.stop()


def sftp_settings(
    server: OpenSSHServer, destination: Path, trusted: Path | None, **overrides: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "target_type": "sftp",
        "host": "127.0.0.1",
        "port": server.port,
        "user": server.account.user,
        "folder": str(destination),
        "key_file": str(server.account.key),
        "known_hosts": str(trusted) if trusted else None,
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


@pytest.fixture
def settings(
    openssh_server: OpenSSHServer, remote: Path, known_hosts: Path
) -> Callable[..., dict[str, Any]]:
    def make(*, server: OpenSSHServer | None = None, **overrides: Any) -> dict[str, Any]:
        return sftp_settings(server or openssh_server, remote, known_hosts, **overrides)

    return make
