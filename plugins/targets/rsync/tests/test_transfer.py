"""Whole series with rsync over ssh: a watching reader, a killed server, secrets kept secret.

The tests come from :mod:`mercure.testing_ssh_transfer`. rsync and ssh run as child
processes: the secrets test must see them run (and none of them show a secret), and each
send's private folder (askpass socket, key copy) must be gone afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from mercure.testing_ssh_transfer import SSHFolderTransferTests

pytestmark = [pytest.mark.peer, pytest.mark.slow]


class TestRsyncTransfer(SSHFolderTransferTests):
    target_type = "rsync"
    programs = {"rsync": "rsync"}
    login_failure_logged = "login failed"
    secrets_series = {"count": 150, "rows": 128, "columns": 128}
    helper_marker = "mercure-rsync-"
    helper_programs = ("ssh", "rsync")

    def private_files(self) -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("mercure-rsync-*"))
