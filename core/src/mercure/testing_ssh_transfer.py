"""Shared slow tests for SSH folder targets: whole series, a killed sshd, secrets kept secret.

The companion of :mod:`mercure.testing_ssh_targets` (read its docstring first): a plugin
subclasses :class:`SSHFolderTransferTests` with its ``target_type`` and says what differs
(the log line of a failed login, its helper processes, the private files of a send).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pydicom
import pytest

from mercure.testing import config_for, dataset_bytes, dcmtk_storescu, start_router, wait_for
from mercure.testing_ssh import (
    OpenSSHServer,
    SeriesWatcher,
    check_delivered,
    processes_containing,
    snapshot,
)
from mercure.testing_ssh_targets import SSHFolderTargetSuite, SSHTargetEnv


class SSHFolderTransferTests(SSHFolderTargetSuite):
    """Whole series: a watching reader, a killed server, secrets kept secret (slow)."""

    #: Text the log of a failed password login holds.
    login_failure_logged: ClassVar[str]
    #: ``make_series`` arguments for the secrets test: large enough that the process scan
    #: sees the target's helper processes while they run, where it has any.
    secrets_series: ClassVar[dict[str, Any]] = {"count": 20}
    #: A text in the command line of the target's own helper processes (ssh, rsync, ...),
    #: and the programs the secrets test must have seen running; none for an in-process client.
    helper_marker: ClassVar[str | None] = None
    helper_programs: ClassVar[tuple[str, ...]] = ()

    def private_files(self) -> set[Path]:
        """Files or folders the target keeps for a send only (the test checks none is left)."""
        return set()

    def test_300_instances_through_the_router_never_show_a_partial_series(
        self, ssh: SSHTargetEnv
    ) -> None:
        """Receiver, router, dispatcher, this target; a reader lists the destination throughout."""
        remote = ssh.remote
        sent = ssh.series("sent", 300, rows=64, columns=64)
        config = config_for(
            ssh.tmp_path,
            targets={"cluster": ssh.settings()},
            rules={"all": {"rule": "True", "target": "cluster"}},
        )
        watcher = SeriesWatcher(remote, expected=300).start()
        try:
            with contextlib.contextmanager(start_router)(config) as router:
                dcmtk_storescu(ssh.tmp_path / "sent", router.port)
                success = config.folder("success")
                jobs = wait_for(
                    lambda: list(success.iterdir()), timeout=120, what="job in success/"
                )
        finally:
            watcher.stop()
        assert watcher.incomplete == [], watcher.incomplete[:5]
        assert watcher.looks > 0 and jobs[0].name in watcher.seen
        series = remote / jobs[0].name
        arrived = sorted(p for p in series.iterdir() if p.suffix == ".dcm")
        assert len(arrived) == 300 and (series / ".complete").exists()
        by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in sent}
        for path in arrived:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert dataset_bytes(path) == dataset_bytes(by_uid.pop(uid))
        assert by_uid == {}
        assert [n for n in os.listdir(remote) if n.startswith(".")] == []

    def test_sshd_killed_mid_transfer_then_the_retry_completes(
        self, ssh: SSHTargetEnv, own_openssh_server: OpenSSHServer
    ) -> None:
        """Kill the server (and every session) with a third of the series up: the next try sends
        only what is missing, and no reader ever sees the series before it is whole."""
        server, remote = own_openssh_server, ssh.remote
        files = ssh.series("series", 300, rows=256, columns=256)
        known = server.write_known_hosts(ssh.tmp_path / "kh")
        env = ssh.start(server=server, known_hosts=str(known))
        ref = env.job(files, "t")
        staging = remote / f".{ref.id}.partial"
        killed = threading.Event()

        def kill_when_a_third_is_up() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if len([n for n in os.listdir(staging) if not n.startswith(".")]) >= 100:
                        server.kill()
                        killed.set()
                        return
                time.sleep(0.002)

        killer = threading.Thread(target=kill_when_a_third_is_up)
        watcher = SeriesWatcher(remote, expected=300).start()
        try:
            killer.start()
            where, task = env.deliver(ref)
            killer.join(130)
            assert killed.is_set(), "the server was not killed during the transfer"
            assert where.state == "outgoing", "the broken try must be retried, not given up"
            assert task.dispatch_state is not None and task.dispatch_state.retries == 1
            assert task.dispatch_state.delivered.get("t", []) == []
            assert not (remote / ref.id).exists(), "nothing is published from a broken try"
            up_before = snapshot(staging)
            assert 100 <= len(up_before) < 300
            assert not [n for n in os.listdir(remote) if not n.startswith(".")]
            server.start()  # same port, same host key
            where, task = env.deliver(ref)
        finally:
            watcher.stop()
        assert where.state == "success", task.error
        series = check_delivered(remote, ref.id, files)
        up_after = snapshot(series)
        resent = [name for name, ident in up_before.items() if up_after[name] != ident]
        assert resent == [], f"complete files sent again: {resent[:5]}"
        assert watcher.incomplete == [], watcher.incomplete[:5]

    def test_no_password_or_key_material_in_logs_task_files_or_processes(
        self,
        ssh: SSHTargetEnv,
        caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While the target sends, no process shows the password, the passphrase or the key in
        its command line or environment; logs and the spool do not hold them either."""
        caplog.set_level(logging.DEBUG)  # the libraries' own debug logs included
        secrets = [ssh.account.password, ssh.account.passphrase]
        key_text = ssh.account.encrypted_key.read_text()
        key_body = "".join(key_text.splitlines()[1:3])  # a stretch of the key's base64
        count = self.secrets_series["count"]
        shape = {k: v for k, v in self.secrets_series.items() if k != "count"}
        files = ssh.series("series", count, **shape)
        hits: list[str] = []
        helpers: set[str] = set()  # the target's own processes the scan saw: proof it looked
        stop = threading.Event()

        def watch_processes() -> None:
            while not stop.is_set():
                for secret in [*secrets, key_body]:
                    hits.extend(processes_containing(secret))
                if self.helper_marker:
                    helpers.update(processes_containing(self.helper_marker))
                time.sleep(0.005)

        variable = f"TEST_{self.target_type.upper()}_PASSWORD"
        monkeypatch.setenv(variable, ssh.account.password)
        private = self.private_files()
        watcher = threading.Thread(target=watch_processes)
        watcher.start()
        try:
            env = ssh.dispatch.start(
                {
                    # From the environment: a child process must not inherit that variable.
                    "pw": ssh.settings(key_file=None, password=f"${{env:{variable}}}"),
                    "key": ssh.settings(
                        key_file=None,
                        private_key=key_text,
                        key_passphrase=ssh.account.passphrase,
                        folder_pattern="key-{task_id}",
                    ),
                    "badpw": ssh.settings(key_file=None, password=ssh.account.password + "x"),
                }
            )
            outcomes = {}
            for name in ("pw", "key", "badpw"):
                outcomes[name] = env.deliver(env.job(files, name))[0].state
        finally:
            stop.set()
            watcher.join(10)
        assert outcomes == {"pw": "success", "key": "success", "badpw": "error"}
        for program in self.helper_programs:
            seen = [hit for hit in helpers if f" {program} " in hit or f"/{program} " in hit]
            assert seen, f"the scan never saw {program} run: {sorted(helpers)[:5]}"
        assert hits == []
        out, err = capfd.readouterr()
        logs = caplog.text + out + err
        assert self.login_failure_logged in logs  # the failure was logged, without the password
        spool_text = b"".join(
            p.read_bytes()
            for p in (ssh.tmp_path / "spool").rglob("*")
            if p.is_file() and p.suffix != ".dcm"
        )
        for secret in [*secrets, key_body, ssh.account.password + "x"]:
            assert secret not in logs
            assert secret.encode() not in spool_text
        assert self.private_files() - private == set(), "what a send kept for itself is removed"


__all__ = ["SSHFolderTransferTests"]
