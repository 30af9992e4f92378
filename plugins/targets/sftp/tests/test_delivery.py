"""Delivery to a real OpenSSH sshd: logins, host keys, layout, retries and their errors.

The tests every SSH folder target shares come from :mod:`mercure.testing_ssh_targets`; this
module says how the sftp target words its errors and adds what only it does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mercure.testing import OpenSSHServer
from mercure.testing_ssh_targets import SSHFolderDeliveryTests, SSHTargetEnv
from mercure_target_sftp.layout import part_name

pytestmark = pytest.mark.peer


class TestSftpDelivery(SSHFolderDeliveryTests):
    target_type = "sftp"
    wrong_login_errors = {
        "password": "login to",
        "key": "login to",
        "passphrase": "cannot load key_file",
    }
    refused_port_error = r"cannot connect to 127\.0\.0\.1"

    def check_changed_host_key_error(self, error: str, old: str, known: Path) -> None:
        assert old in error, "both keys are named"

    def check_pinned_on_first_use(self, known: Path, server: OpenSSHServer) -> None:
        assert known.read_text() == server.known_hosts_line
        assert (known.stat().st_mode & 0o777) == 0o600

    def leave_temporary_file(self, staging: Path, name: str) -> None:
        Path(part_name(str(staging / name))).write_bytes(b"partial")

    def check_connection_line(self, line: str, server: OpenSSHServer) -> None:
        assert server.fingerprint in line

    def test_encrypted_key_without_passphrase_says_so(self, ssh: SSHTargetEnv) -> None:
        ssh.start(key_file=str(ssh.account.encrypted_key))
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error" and "set key_passphrase" in (task.error or "")
