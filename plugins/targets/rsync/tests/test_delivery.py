"""Delivery with rsync over ssh to a real sshd: logins, host keys, layout, retries, the hook.

The tests every SSH folder target shares come from :mod:`mercure.testing_ssh_targets`; this
module says how the rsync target words its errors and adds what only it does: the rsync
program, and mercure's ``mercure_complete.sh`` (``run_on_complete``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mercure.testing import OpenSSHServer
from mercure.testing_ssh import SSHAccount, snapshot
from mercure.testing_ssh_targets import SSHFolderDeliveryTests, SSHTargetEnv

pytestmark = pytest.mark.peer

HOOK = """#!/bin/sh
# Record the arguments and how many instances the series folder held when this ran.
printf '%s|%s\\n' "$*" "$(ls "$1" | grep -c '\\.dcm$')" >> "$(dirname "$0")/hook.log"
exit "$(cat "$(dirname "$0")/hook.exit" 2>/dev/null || echo 0)"
"""


def install_hook(remote: Path, account: SSHAccount, exit_code: int = 0) -> Path:
    script = remote / "mercure_complete.sh"
    script.write_text(HOOK)
    script.chmod(0o755)
    (remote / "hook.exit").write_text(str(exit_code))
    for path in (script, remote / "hook.exit"):
        os.chown(path, account.uid, account.gid)
    return remote / "hook.log"


class TestRsyncDelivery(SSHFolderDeliveryTests):
    target_type = "rsync"
    programs = {"rsync": "rsync"}
    wrong_login_errors = dict.fromkeys(("password", "key", "passphrase"), "login failed")
    refused_port_error = "refused"

    def check_changed_host_key_error(self, error: str, old: str, known: Path) -> None:
        assert old not in error and str(known) in error

    def leave_temporary_file(self, staging: Path, name: str) -> None:
        (staging / f".{name}.Ab12Cd").write_bytes(b"rsync temp")  # rsync's own temporary name

    def check_connection_line(self, line: str, server: OpenSSHServer) -> None:
        assert "rsync" in line and "version" in line

    def test_missing_rsync_program_is_a_configuration_error(self, ssh: SSHTargetEnv) -> None:
        ssh.start(rsync_path="/nonexistent/rsync")
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error"
        assert "'/nonexistent/rsync' is not installed" in (task.error or "")
        assert "apt-get install rsync" in (task.error or "")

    # -- run_on_complete ---------------------------------------------------------------------

    def test_run_on_complete_runs_mercure_complete_sh(self, ssh: SSHTargetEnv) -> None:
        log = install_hook(ssh.remote, ssh.account)
        files = ssh.series("series", 5)
        ssh.start(run_on_complete=True)
        ref, where, task = ssh.send(files)
        assert where.state == "success", task.error
        assert log.read_text() == f"{ssh.remote / ref.id} rsync t {ref.id}|5\n"

    def test_a_failing_hook_is_retried_without_sending_again(self, ssh: SSHTargetEnv) -> None:
        log = install_hook(ssh.remote, ssh.account, exit_code=3)
        files = ssh.series("series", 3)
        env = ssh.start(run_on_complete=True)
        ref, where, task = ssh.send(files)
        assert where.state == "outgoing", "a failing hook is retried"
        assert task.dispatch_state is not None
        assert "mercure_complete.sh on" in str(task.dispatch_state.attempts[-1].error)
        assert "(exit 3)" in str(task.dispatch_state.attempts[-1].error)
        before = snapshot(ssh.remote / ref.id)
        (ssh.remote / "hook.exit").write_text("0")
        where, task = env.deliver(ref)
        assert where.state == "success", task.error
        assert snapshot(ssh.remote / ref.id) == before
        assert log.read_text().splitlines() == [f"{ssh.remote / ref.id} rsync t {ref.id}|3"] * 2

    def test_a_missing_hook_is_a_configuration_error(self, ssh: SSHTargetEnv) -> None:
        ssh.start(run_on_complete=True)
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error"
        assert "mercure_complete.sh" in (task.error or "") and "not retried" in (task.error or "")
