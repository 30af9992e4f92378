"""Whole series against a real sshd: a watching reader, a killed server, secrets kept secret.

The tests come from :mod:`mercure.testing_ssh_transfer`; paramiko runs in the router's own
process, so there are no helper processes to look for.
"""

from __future__ import annotations

import pytest
from mercure.testing_ssh_transfer import SSHFolderTransferTests

pytestmark = [pytest.mark.peer, pytest.mark.slow]


class TestSftpTransfer(SSHFolderTransferTests):
    target_type = "sftp"
    login_failure_logged = "login to"
