"""Fixtures for the sftp target's tests; sshd, its test user and folders come from the core.

``settings(**overrides)`` gives the target's settings for the session's sshd
(``openssh_server``) and a fresh destination (``ssh_destination``), checked against
``ssh_known_hosts``; see :func:`mercure.testing_ssh.ssh_target_settings`. The server runs on
this machine, so a test looks at what arrived with ordinary file functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mercure.testing import OpenSSHServer
from mercure.testing_ssh import SettingsFactory, ssh_target_settings


@pytest.fixture
def settings(
    openssh_server: OpenSSHServer, ssh_destination: Path, ssh_known_hosts: Path
) -> SettingsFactory:
    return ssh_target_settings("sftp", openssh_server, ssh_destination, ssh_known_hosts)
