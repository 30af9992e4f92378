"""Shared tests for targets that deliver a series into a folder on a real sshd.

Every such target (``sftp``, ``rsync`` over ssh, ...) promises the same: mercure's layout
(:mod:`mercure.remote_layout`), logins by password, key or passphrase-protected key, host keys
checked (known_hosts, a pinned fingerprint, trust on first use), a reader never sees half a
series, a retry sends only what is missing, and no secret shows in logs, task files or the
process list. A plugin's tests subclass the two classes below, which pytest then collects::

    class TestDelivery(SSHFolderDeliveryTests):
        target_type = "sftp"
        wrong_login_errors = {...}
        ...

and its ``conftest.py`` provides the ``settings`` fixture (see
:func:`mercure.testing_ssh.ssh_target_settings`). Class attributes and the ``check_*`` /
``leave_*`` methods hold what differs between the targets (the wording of their errors, the
temporary files a broken transfer leaves); each assertion a plugin adds there comes on top of
the shared ones. The other fixtures come from :mod:`mercure.testing` (``openssh_server``,
``ssh_account``, ``ssh_destination``, ``own_openssh_server``, ``dispatch_env``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pydicom
import pytest

from mercure.jobs.store import JobRef
from mercure.jobs.task import Task
from mercure.remote_layout import series_paths
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import (
    DispatchEnv,
    config_for,
    dataset_bytes,
    dcmtk_storescu,
    free_port,
    make_series,
    start_router,
    wait_for,
)
from mercure.testing_ssh import (
    OpenSSHServer,
    SeriesWatcher,
    SettingsFactory,
    SSHAccount,
    check_delivered,
    fingerprint_of,
    make_keypair,
    processes_containing,
    snapshot,
)


def deliver_once(
    env: DispatchEnv, files: list[Path], tags: dict[str, str] | None = None
) -> tuple[JobRef, JobRef, Task]:
    """A new job for target ``t`` and one delivery attempt: (job, where it is now, task file)."""
    ref = env.job(files, "t", tags)
    where, task = env.deliver(ref)
    return ref, where, task


class SSHFolderDeliveryTests:
    """Logins, host keys, the remote folder, layout, retries and the connection test."""

    #: The plugin's ``target_type``.
    target_type: ClassVar[str]
    #: Text the error of each wrong login holds: keys ``password``, ``key``, ``passphrase``.
    wrong_login_errors: ClassVar[dict[str, str]]
    #: Regular expression the connection test's error matches when nothing listens.
    refused_port_error: ClassVar[str]

    def check_changed_host_key_error(self, error: str, old: str, known: Path) -> None:
        """What the error for a changed host key says beyond "CHANGED" and the new key."""

    def check_pinned_on_first_use(self, known: Path, server: OpenSSHServer) -> None:
        """How trust on first use wrote the server's key into ``known``."""
        assert server.host_public_key in known.read_text()

    def leave_temporary_file(self, staging: Path, name: str) -> None:
        """Leave in ``staging`` what a broken upload of file ``name`` leaves behind."""

    def check_connection_line(self, line: str, server: OpenSSHServer) -> None:
        """What the connection test reports beyond "writable"."""

    # -- logins -------------------------------------------------------------------------------

    @pytest.mark.parametrize("login", ["key", "password", "passphrase", "private_key"])
    def test_logins_deliver_in_mercures_layout(
        self,
        login: str,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        ssh_account: SSHAccount,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        if login == "key":
            target = settings()
        elif login == "password":
            target = settings(key_file=None, password=ssh_account.password)
        elif login == "passphrase":
            target = settings(
                key_file=str(ssh_account.encrypted_key), key_passphrase=ssh_account.passphrase
            )
        else:
            variable = f"TEST_{self.target_type.upper()}_PASSPHRASE"
            monkeypatch.setenv(variable, ssh_account.passphrase)
            target = settings(
                key_file=None,
                private_key=f"${{file:{ssh_account.encrypted_key}}}",
                key_passphrase=f"${{env:{variable}}}",
            )
        files = make_series(tmp_path / "series", 7)
        env = dispatch_env.start({"t": target})
        ref, where, task = deliver_once(env, files)
        assert where.state == "success", task.error
        check_delivered(ssh_destination, ref.id, files)
        assert task.dispatch_state is not None
        assert sorted(task.dispatch_state.delivered["t"]) == sorted(f.name for f in files)

    @pytest.mark.parametrize("login", ["password", "key", "passphrase"])
    def test_wrong_credentials_go_to_error_at_once(
        self,
        login: str,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_account: SSHAccount,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        if login == "password":
            target = settings(key_file=None, password="not-" + ssh_account.password)
        elif login == "key":
            target = settings(key_file=str(make_keypair(tmp_path / "stranger")))
        else:
            target = settings(key_file=str(ssh_account.encrypted_key), key_passphrase="wrong")
        env = dispatch_env.start({"t": target})
        _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 2))
        assert where.state == "error", "a login that cannot succeed must not be retried"
        assert task.dispatch_state is not None and task.dispatch_state.retries == 0
        error = task.error or ""
        assert self.wrong_login_errors[login] in error and "not retried" in error
        assert os.listdir(ssh_destination) == []

    # -- host keys ----------------------------------------------------------------------------

    def test_unknown_host_is_refused_with_its_fingerprint(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        openssh_server: OpenSSHServer,
        tmp_path: Path,
    ) -> None:
        empty = tmp_path / "empty_known_hosts"
        empty.write_text("")
        env = dispatch_env.start({"t": settings(known_hosts=str(empty))})
        _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
        assert where.state == "error"
        assert "is not known" in (task.error or "")
        assert openssh_server.fingerprint in (task.error or "")
        assert empty.read_text() == "", "nothing may be pinned without trust_on_first_use"

    def test_changed_host_key_is_refused(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        own_openssh_server: OpenSSHServer,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        """The same server and port answer with a new identity: refused, the new key named."""
        server = own_openssh_server
        known = server.write_known_hosts(tmp_path / "kh")
        old = server.fingerprint
        env = dispatch_env.start({"t": settings(server=server, known_hosts=str(known))})
        ref, where, task = deliver_once(env, make_series(tmp_path / "a", 1))
        assert where.state == "success", task.error
        server.restart(new_host_key=True)
        assert server.fingerprint != old
        _ref, where, task = deliver_once(env, make_series(tmp_path / "b", 1))
        assert where.state == "error"
        error = task.error or ""
        assert "CHANGED" in error and server.fingerprint in error
        self.check_changed_host_key_error(error, old, known)
        assert sorted(os.listdir(ssh_destination)) == [ref.id], "nothing may reach it"

    def test_pinned_fingerprint(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        openssh_server: OpenSSHServer,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        files = make_series(tmp_path / "series", 2)
        env = dispatch_env.start(
            {"t": settings(known_hosts=None, host_key_fingerprint=openssh_server.fingerprint)}
        )
        ref, where, task = deliver_once(env, files)
        assert where.state == "success", task.error
        check_delivered(ssh_destination, ref.id, files)

    def test_wrong_pinned_fingerprint_is_refused(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        openssh_server: OpenSSHServer,
        tmp_path: Path,
    ) -> None:
        make_keypair(tmp_path / "other")
        pin = fingerprint_of((tmp_path / "other.pub").read_text())
        assert pin != openssh_server.fingerprint
        env = dispatch_env.start({"t": settings(known_hosts=None, host_key_fingerprint=pin)})
        _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
        assert where.state == "error"
        assert pin in (task.error or "") and openssh_server.fingerprint in (task.error or "")

    def test_trust_on_first_use_pins_the_key(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        own_openssh_server: OpenSSHServer,
        tmp_path: Path,
    ) -> None:
        server = own_openssh_server
        known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its folder exist yet
        env = dispatch_env.start(
            {"t": settings(server=server, known_hosts=str(known), trust_on_first_use=True)}
        )
        _ref, where, task = deliver_once(env, make_series(tmp_path / "a", 1))
        assert where.state == "success", task.error
        self.check_pinned_on_first_use(known, server)
        pinned = known.read_text()
        _ref, where, task = deliver_once(env, make_series(tmp_path / "b", 1))
        assert where.state == "success", task.error
        assert known.read_text() == pinned, "pinned once, not again"
        server.restart(new_host_key=True)
        _ref, where, task = deliver_once(env, make_series(tmp_path / "c", 1))
        assert where.state == "error" and "CHANGED" in (task.error or "")

    # -- the remote folder --------------------------------------------------------------------

    def test_missing_base_folder_is_a_configuration_error(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        env = dispatch_env.start({"t": settings(folder=str(ssh_destination / "nope"))})
        _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
        assert where.state == "error" and "does not exist" in (task.error or "")

    def test_permission_denied_goes_to_error_at_once(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_account: SSHAccount,
        tmp_path: Path,
    ) -> None:
        locked = ssh_account.folder(f"locked-{uuid.uuid4().hex[:6]}", owned=False)  # root's
        env = dispatch_env.start({"t": settings(folder=str(locked))})
        _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
        assert where.state == "error"
        assert "permission denied" in (task.error or "").lower()
        assert os.listdir(locked) == []

    @pytest.mark.parametrize(
        ("patient", "folder"),
        [("P/../1", "P_.._1"), ("P 'x'; $(id)", "P 'x'; $(id)")],
        ids=["path", "shell"],
    )
    def test_patterns_lay_out_by_tags(
        self,
        patient: str,
        folder: str,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        """Tag values become folder names, never paths outside the folder or commands."""
        files = make_series(tmp_path / "series", 4, PatientID=patient)
        first = pydicom.dcmread(files[0])
        env = dispatch_env.start(
            {
                "t": settings(
                    folder_pattern="{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
                    file_pattern="{SeriesNumber}/{SOPInstanceUID}.dcm",
                )
            }
        )
        tags = {
            "PatientID": str(first.PatientID),
            "StudyInstanceUID": str(first.StudyInstanceUID),
            "SeriesInstanceUID": str(first.SeriesInstanceUID),
        }
        _ref, where, task = deliver_once(env, files, tags)
        assert where.state == "success", task.error
        series = ssh_destination / folder / first.StudyInstanceUID / first.SeriesInstanceUID
        assert sorted(os.listdir(series)) == [".complete", "1"]
        for src in files:
            uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
            assert (series / "1" / f"{uid}.dcm").read_bytes() == src.read_bytes()
        assert not [n for n in os.listdir(series.parent) if n.startswith(".")]
        assert os.listdir(ssh_destination) == [folder]

    def test_a_series_folder_taken_by_another_job_gets_its_own_name(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        env = dispatch_env.start({"t": settings(folder_pattern="{SeriesInstanceUID}")})
        first = make_series(tmp_path / "a", 2, series_uid="1.2.3.4")
        second = make_series(tmp_path / "b", 3, series_uid="1.2.3.4")
        tags = {"SeriesInstanceUID": "1.2.3.4"}
        ref1, where, task = deliver_once(env, first, tags)
        assert where.state == "success", task.error
        ref2, where, task = deliver_once(env, second, tags)
        assert where.state == "success", task.error
        check_delivered(ssh_destination, ref1.id, first, folder="1.2.3.4")
        check_delivered(ssh_destination, ref2.id, second, folder=f"1.2.3.4_{ref2.id}")

    @pytest.mark.parametrize("problem", ["unreadable", "same path"])
    def test_a_series_that_would_be_incomplete_is_not_sent(
        self,
        problem: str,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        """An instance that cannot be sent fails the job at once; nothing appears on the server."""
        files = make_series(tmp_path / "series", 3)
        if problem == "unreadable":
            bad = tmp_path / "series" / "junk.dcm"
            bad.write_bytes(b"not DICOM at all")
        else:
            bad = tmp_path / "series" / "copy.dcm"
            shutil.copyfile(files[0], bad)  # the same SOP instance under a second name
        env = dispatch_env.start({"t": settings(file_pattern="{SOPInstanceUID}.dcm")})
        _ref, where, task = deliver_once(env, [*files, bad])
        assert where.state == "error"
        assert task.dispatch_state is not None
        reasons = task.dispatch_state.failed["t"]
        assert ("cannot read" if problem == "unreadable" else "for both") in str(reasons)
        assert "would be incomplete" in (task.error or "")
        assert os.listdir(ssh_destination) == []

    # -- retries ------------------------------------------------------------------------------

    def test_retry_resumes_a_staging_folder_without_resending(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        ssh_account: SSHAccount,
        tmp_path: Path,
    ) -> None:
        """What a broken try left in the staging folder: complete files stay, the rest is sent,
        and the broken try's temporary file is not published."""
        files = make_series(tmp_path / "series", 6)
        env = dispatch_env.start({"t": settings()})
        ref = env.job(files, "t")
        staging = Path(series_paths(str(ssh_destination), ref.id, ref.id).staging)
        staging.mkdir()
        for src in files[:3]:  # three complete files, with their times (as rsync --times)
            dest = staging / src.name
            dest.write_bytes(src.read_bytes())
            st = src.stat()
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        (staging / files[3].name).write_bytes(files[3].read_bytes()[:100])  # one cut short
        self.leave_temporary_file(staging, files[4].name)
        for path in [staging, *staging.iterdir()]:
            os.chown(path, ssh_account.uid, ssh_account.gid)
        before = snapshot(staging)
        where, task = env.deliver(ref)
        assert where.state == "success", task.error
        series = check_delivered(ssh_destination, ref.id, files)
        after = snapshot(series)
        for src in files[:3]:
            assert after[src.name] == before[src.name], f"{src.name} was sent again"
        assert after[files[3].name] != before[files[3].name]

    def test_retry_after_publishing_but_before_the_record_sends_nothing(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        """A crash between the rename and the task file: the retry finds its complete series."""
        files = make_series(tmp_path / "series", 4)
        env = dispatch_env.start({"t": settings()})
        ref = env.job(files, "t")
        assert env.runtime is not None
        job_ref = env.where(ref)
        task = env.runtime.store.read(job_ref)
        job = DeliveryJob(ref.id, job_ref.path, sorted(job_ref.path.glob("*.dcm")), {}, task)
        assert sorted(env.runtime.target("t").send(job).delivered) == sorted(f.name for f in files)
        before = snapshot(ssh_destination)
        where, task = env.deliver(ref)  # the dispatcher never recorded the first send
        assert where.state == "success", task.error
        check_delivered(ssh_destination, ref.id, files)
        assert snapshot(ssh_destination) == before, "nothing may be sent twice"
        assert sorted(os.listdir(ssh_destination)) == [ref.id]

    def test_parallel_jobs_from_several_threads(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        env = dispatch_env.start({"t": settings()})
        jobs = [(env.job(make_series(tmp_path / f"s{i}", 12), "t"), i) for i in range(6)]
        dispatcher = env.dispatcher
        assert dispatcher is not None
        threads = [
            threading.Thread(target=dispatcher.deliver, args=(env.where(ref),)) for ref, _ in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for ref, i in jobs:
            assert env.where(ref).state == "success"
            check_delivered(ssh_destination, ref.id, sorted((tmp_path / f"s{i}").glob("*.dcm")))

    # -- test_connection ----------------------------------------------------------------------

    def test_connection_test(
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        openssh_server: OpenSSHServer,
        ssh_destination: Path,
    ) -> None:
        env = dispatch_env.start({"t": settings()})
        assert env.runtime is not None
        line = env.runtime.target("t").test_connection()
        assert "writable" in line
        self.check_connection_line(line, openssh_server)
        assert os.listdir(ssh_destination) == [], "the test leaves nothing behind"

    def test_connection_test_reports_a_refused_port(
        self, dispatch_env: DispatchEnv, settings: SettingsFactory
    ) -> None:
        env = dispatch_env.start({"t": settings(port=free_port())})
        assert env.runtime is not None
        with pytest.raises(TargetError, match=self.refused_port_error):
            env.runtime.target("t").test_connection()


class SSHFolderTransferTests:
    """Whole series: a watching reader, a killed server, secrets kept secret (slow)."""

    #: The plugin's ``target_type``.
    target_type: ClassVar[str]
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
        self, settings: SettingsFactory, ssh_destination: Path, tmp_path: Path
    ) -> None:
        """Receiver, router, dispatcher, this target; a reader lists the destination throughout."""
        remote = ssh_destination
        sent = make_series(tmp_path / "sent", 300, rows=64, columns=64)
        config = config_for(
            tmp_path,
            targets={"cluster": settings()},
            rules={"all": {"rule": "True", "target": "cluster"}},
        )
        watcher = SeriesWatcher(remote, expected=300).start()
        try:
            with contextlib.contextmanager(start_router)(config) as router:
                dcmtk_storescu(tmp_path / "sent", router.port)
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
        self,
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        own_openssh_server: OpenSSHServer,
        ssh_destination: Path,
        tmp_path: Path,
    ) -> None:
        """Kill the server (and every session) with a third of the series up: the next try sends
        only what is missing, and no reader ever sees the series before it is whole."""
        server, remote = own_openssh_server, ssh_destination
        files = make_series(tmp_path / "series", 300, rows=256, columns=256)
        known = server.write_known_hosts(tmp_path / "kh")
        env = dispatch_env.start({"t": settings(server=server, known_hosts=str(known))})
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
        dispatch_env: DispatchEnv,
        settings: SettingsFactory,
        ssh_account: SSHAccount,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While the target sends, no process shows the password, the passphrase or the key in
        its command line or environment; logs and the spool do not hold them either."""
        caplog.set_level(logging.DEBUG)  # the libraries' own debug logs included
        secrets = [ssh_account.password, ssh_account.passphrase]
        key_text = ssh_account.encrypted_key.read_text()
        key_body = "".join(key_text.splitlines()[1:3])  # a stretch of the key's base64
        count = self.secrets_series["count"]
        shape = {k: v for k, v in self.secrets_series.items() if k != "count"}
        files = make_series(tmp_path / "series", count, **shape)
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
        monkeypatch.setenv(variable, ssh_account.password)
        private = self.private_files()
        watcher = threading.Thread(target=watch_processes)
        watcher.start()
        try:
            env = dispatch_env.start(
                {
                    # From the environment: a child process must not inherit that variable.
                    "pw": settings(key_file=None, password=f"${{env:{variable}}}"),
                    "key": settings(
                        key_file=None,
                        private_key=key_text,
                        key_passphrase=ssh_account.passphrase,
                        folder_pattern="key-{task_id}",
                    ),
                    "badpw": settings(key_file=None, password=ssh_account.password + "x"),
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
            for p in (tmp_path / "spool").rglob("*")
            if p.is_file() and p.suffix != ".dcm"
        )
        for secret in [*secrets, key_body, ssh_account.password + "x"]:
            assert secret not in logs
            assert secret.encode() not in spool_text
        assert self.private_files() - private == set(), "what a send kept for itself is removed"


__all__ = ["SSHFolderDeliveryTests", "SSHFolderTransferTests", "deliver_once"]
