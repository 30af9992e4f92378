"""Shared tests for targets that deliver a series into a folder on a real sshd.

Every such target (``sftp``, ``rsync`` over ssh, ...) promises the same: mercure's layout
(:mod:`mercure.remote_layout`), logins by password, key or passphrase-protected key, host keys
checked (known_hosts, a pinned fingerprint, trust on first use), a reader never sees half a
series, a retry sends only what is missing, and no secret shows in logs, task files or the
process list. A plugin's tests subclass :class:`SSHFolderDeliveryTests` here and
:class:`mercure.testing_ssh_transfer.SSHFolderTransferTests` (whole series, slow), which
pytest then collects::

    class TestDelivery(SSHFolderDeliveryTests):
        target_type = "sftp"
        wrong_login_errors = {...}
        ...

Class attributes and the ``check_*`` / ``leave_*`` methods hold what differs between the
targets (the wording of their errors, the temporary files a broken transfer leaves); what a
plugin asserts there comes on top of the shared assertions. Tests of the plugin's own
features go into the same subclass and get the ``ssh`` fixture (:class:`SSHTargetEnv`),
built on the fixtures of :mod:`mercure.testing` (``openssh_server``, ``ssh_account``,
``ssh_destination``, ``ssh_known_hosts``, ``dispatch_env``); ``own_openssh_server`` gives a
test an sshd of its own to kill or re-key.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from dataclasses import dataclass
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
    free_port,
    make_series,
)
from mercure.testing_ssh import (
    OpenSSHServer,
    SettingsFactory,
    SSHAccount,
    check_delivered,
    fingerprint_of,
    make_keypair,
    snapshot,
    ssh_target_settings,
)


@dataclass
class SSHTargetEnv:
    """What a test of an SSH folder target works with: target ``t`` of the plugin's type
    for the session's sshd (key login, known host key), its destination folder, the test
    account and the core's dispatcher."""

    dispatch: DispatchEnv
    #: ``settings(**overrides)``, see :func:`mercure.testing_ssh.ssh_target_settings`.
    settings: SettingsFactory
    #: The target's folder, on this machine (the server is local): look with file functions.
    remote: Path
    account: SSHAccount
    server: OpenSSHServer
    tmp_path: Path

    def start(self, **overrides: Any) -> DispatchEnv:
        """(Re)build the dispatcher with target ``t`` of ``settings(**overrides)``."""
        return self.dispatch.start({"t": self.settings(**overrides)})

    def series(self, name: str, count: int, **kwargs: Any) -> list[Path]:
        """``make_series`` into ``tmp_path / name``."""
        return make_series(self.tmp_path / name, count, **kwargs)

    def send(
        self, files: list[Path], tags: dict[str, str] | None = None
    ) -> tuple[JobRef, JobRef, Task]:
        """A new job for ``t`` and one delivery attempt: (job, where it is now, task file)."""
        ref = self.dispatch.job(files, "t", tags)
        where, task = self.dispatch.deliver(ref)
        return ref, where, task


class SSHFolderTargetSuite:
    """What both test classes need: the plugin's type, its programs, the ``ssh`` fixture."""

    #: The plugin's ``target_type``.
    target_type: ClassVar[str]
    #: Local programs the target runs -> the Debian package that has them; the tests are
    #: skipped, saying which to install, where one is missing.
    programs: ClassVar[dict[str, str]] = {}

    @pytest.fixture
    def ssh(
        self,
        dispatch_env: DispatchEnv,
        openssh_server: OpenSSHServer,
        ssh_account: SSHAccount,
        ssh_destination: Path,
        ssh_known_hosts: Path,
        tmp_path: Path,
    ) -> SSHTargetEnv:
        for program, package in self.programs.items():
            if shutil.which(program) is None:
                pytest.skip(f"{program} is not installed (apt-get install {package})")
        settings = ssh_target_settings(
            self.target_type, openssh_server, ssh_destination, ssh_known_hosts
        )
        return SSHTargetEnv(
            dispatch_env, settings, ssh_destination, ssh_account, openssh_server, tmp_path
        )


class SSHFolderDeliveryTests(SSHFolderTargetSuite):
    """Logins, host keys, the remote folder, layout, retries and the connection test."""

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
        self, ssh: SSHTargetEnv, login: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        account = ssh.account
        login_settings: dict[str, Any] = {}
        if login == "password":
            login_settings = {"key_file": None, "password": account.password}
        elif login == "passphrase":
            login_settings = {
                "key_file": str(account.encrypted_key),
                "key_passphrase": account.passphrase,
            }
        elif login == "private_key":
            variable = f"TEST_{self.target_type.upper()}_PASSPHRASE"
            monkeypatch.setenv(variable, account.passphrase)
            login_settings = {
                "key_file": None,
                "private_key": f"${{file:{account.encrypted_key}}}",
                "key_passphrase": f"${{env:{variable}}}",
            }
        files = ssh.series("series", 7)
        ssh.start(**login_settings)
        ref, where, task = ssh.send(files)
        assert where.state == "success", task.error
        check_delivered(ssh.remote, ref.id, files)
        assert task.dispatch_state is not None
        assert sorted(task.dispatch_state.delivered["t"]) == sorted(f.name for f in files)

    @pytest.mark.parametrize("login", ["password", "key", "passphrase"])
    def test_wrong_credentials_go_to_error_at_once(self, ssh: SSHTargetEnv, login: str) -> None:
        if login == "password":
            ssh.start(key_file=None, password="not-" + ssh.account.password)
        elif login == "key":
            ssh.start(key_file=str(make_keypair(ssh.tmp_path / "stranger")))
        else:
            ssh.start(key_file=str(ssh.account.encrypted_key), key_passphrase="wrong")
        _ref, where, task = ssh.send(ssh.series("series", 2))
        assert where.state == "error", "a login that cannot succeed must not be retried"
        assert task.dispatch_state is not None and task.dispatch_state.retries == 0
        error = task.error or ""
        assert self.wrong_login_errors[login] in error and "not retried" in error
        assert os.listdir(ssh.remote) == []

    # -- host keys ----------------------------------------------------------------------------

    def test_unknown_host_is_refused_with_its_fingerprint(self, ssh: SSHTargetEnv) -> None:
        empty = ssh.tmp_path / "empty_known_hosts"
        empty.write_text("")
        ssh.start(known_hosts=str(empty))
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error"
        assert "is not known" in (task.error or "")
        assert ssh.server.fingerprint in (task.error or "")
        assert empty.read_text() == "", "nothing may be pinned without trust_on_first_use"

    def test_changed_host_key_is_refused(
        self, ssh: SSHTargetEnv, own_openssh_server: OpenSSHServer
    ) -> None:
        """The same server and port answer with a new identity: refused, the new key named."""
        server = own_openssh_server
        known = server.write_known_hosts(ssh.tmp_path / "kh")
        old = server.fingerprint
        ssh.start(server=server, known_hosts=str(known))
        ref, where, task = ssh.send(ssh.series("a", 1))
        assert where.state == "success", task.error
        server.restart(new_host_key=True)
        assert server.fingerprint != old
        _ref, where, task = ssh.send(ssh.series("b", 1))
        assert where.state == "error"
        error = task.error or ""
        assert "CHANGED" in error and server.fingerprint in error
        self.check_changed_host_key_error(error, old, known)
        assert sorted(os.listdir(ssh.remote)) == [ref.id], "nothing may reach it"

    def test_pinned_fingerprint(self, ssh: SSHTargetEnv) -> None:
        files = ssh.series("series", 2)
        ssh.start(known_hosts=None, host_key_fingerprint=ssh.server.fingerprint)
        ref, where, task = ssh.send(files)
        assert where.state == "success", task.error
        check_delivered(ssh.remote, ref.id, files)

    def test_wrong_pinned_fingerprint_is_refused(self, ssh: SSHTargetEnv) -> None:
        make_keypair(ssh.tmp_path / "other")
        pin = fingerprint_of((ssh.tmp_path / "other.pub").read_text())
        assert pin != ssh.server.fingerprint
        ssh.start(known_hosts=None, host_key_fingerprint=pin)
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error"
        assert pin in (task.error or "") and ssh.server.fingerprint in (task.error or "")

    def test_trust_on_first_use_pins_the_key(
        self, ssh: SSHTargetEnv, own_openssh_server: OpenSSHServer
    ) -> None:
        server = own_openssh_server
        known = ssh.tmp_path / "ssh" / "known_hosts"  # neither the file nor its folder exist yet
        ssh.start(server=server, known_hosts=str(known), trust_on_first_use=True)
        _ref, where, task = ssh.send(ssh.series("a", 1))
        assert where.state == "success", task.error
        self.check_pinned_on_first_use(known, server)
        pinned = known.read_text()
        _ref, where, task = ssh.send(ssh.series("b", 1))
        assert where.state == "success", task.error
        assert known.read_text() == pinned, "pinned once, not again"
        server.restart(new_host_key=True)
        _ref, where, task = ssh.send(ssh.series("c", 1))
        assert where.state == "error" and "CHANGED" in (task.error or "")

    # -- the remote folder --------------------------------------------------------------------

    def test_missing_base_folder_is_a_configuration_error(self, ssh: SSHTargetEnv) -> None:
        ssh.start(folder=str(ssh.remote / "nope"))
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error" and "does not exist" in (task.error or "")

    def test_permission_denied_goes_to_error_at_once(self, ssh: SSHTargetEnv) -> None:
        locked = ssh.account.folder(f"locked-{uuid.uuid4().hex[:6]}", owned=False)  # root's
        ssh.start(folder=str(locked))
        _ref, where, task = ssh.send(ssh.series("series", 1))
        assert where.state == "error"
        assert "permission denied" in (task.error or "").lower()
        assert os.listdir(locked) == []

    @pytest.mark.parametrize(
        ("patient", "folder"),
        [("P/../1", "P_.._1"), ("P 'x'; $(id)", "P 'x'; $(id)")],
        ids=["path", "shell"],
    )
    def test_patterns_lay_out_by_tags(self, ssh: SSHTargetEnv, patient: str, folder: str) -> None:
        """Tag values become folder names, never paths outside the folder or commands."""
        files = ssh.series("series", 4, PatientID=patient)
        first = pydicom.dcmread(files[0])
        ssh.start(
            folder_pattern="{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
            file_pattern="{SeriesNumber}/{SOPInstanceUID}.dcm",
        )
        tags = {
            "PatientID": str(first.PatientID),
            "StudyInstanceUID": str(first.StudyInstanceUID),
            "SeriesInstanceUID": str(first.SeriesInstanceUID),
        }
        _ref, where, task = ssh.send(files, tags)
        assert where.state == "success", task.error
        series = ssh.remote / folder / first.StudyInstanceUID / first.SeriesInstanceUID
        assert sorted(os.listdir(series)) == [".complete", "1"]
        for src in files:
            uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
            assert (series / "1" / f"{uid}.dcm").read_bytes() == src.read_bytes()
        assert not [n for n in os.listdir(series.parent) if n.startswith(".")]
        assert os.listdir(ssh.remote) == [folder]

    def test_a_series_folder_taken_by_another_job_gets_its_own_name(
        self, ssh: SSHTargetEnv
    ) -> None:
        ssh.start(folder_pattern="{SeriesInstanceUID}")
        first = ssh.series("a", 2, series_uid="1.2.3.4")
        second = ssh.series("b", 3, series_uid="1.2.3.4")
        tags = {"SeriesInstanceUID": "1.2.3.4"}
        ref1, where, task = ssh.send(first, tags)
        assert where.state == "success", task.error
        ref2, where, task = ssh.send(second, tags)
        assert where.state == "success", task.error
        check_delivered(ssh.remote, ref1.id, first, folder="1.2.3.4")
        check_delivered(ssh.remote, ref2.id, second, folder=f"1.2.3.4_{ref2.id}")

    @pytest.mark.parametrize("problem", ["unreadable", "same path"])
    def test_a_series_that_would_be_incomplete_is_not_sent(
        self, ssh: SSHTargetEnv, problem: str
    ) -> None:
        """An instance that cannot be sent fails the job at once; nothing appears on the server."""
        files = ssh.series("series", 3)
        if problem == "unreadable":
            bad = ssh.tmp_path / "series" / "junk.dcm"
            bad.write_bytes(b"not DICOM at all")
        else:
            bad = ssh.tmp_path / "series" / "copy.dcm"
            shutil.copyfile(files[0], bad)  # the same SOP instance under a second name
        ssh.start(file_pattern="{SOPInstanceUID}.dcm")
        _ref, where, task = ssh.send([*files, bad])
        assert where.state == "error"
        assert task.dispatch_state is not None
        reasons = task.dispatch_state.failed["t"]
        assert ("cannot read" if problem == "unreadable" else "for both") in str(reasons)
        assert "would be incomplete" in (task.error or "")
        assert os.listdir(ssh.remote) == []

    # -- retries ------------------------------------------------------------------------------

    def test_retry_resumes_a_staging_folder_without_resending(self, ssh: SSHTargetEnv) -> None:
        """What a broken try left in the staging folder: complete files stay, the rest is sent,
        and the broken try's temporary file is not published."""
        files = ssh.series("series", 6)
        env = ssh.start()
        ref = env.job(files, "t")
        staging = Path(series_paths(str(ssh.remote), ref.id, ref.id).staging)
        staging.mkdir()
        for src in files[:3]:  # three complete files, with their times (as rsync --times)
            dest = staging / src.name
            dest.write_bytes(src.read_bytes())
            st = src.stat()
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        (staging / files[3].name).write_bytes(files[3].read_bytes()[:100])  # one cut short
        self.leave_temporary_file(staging, files[4].name)
        for path in [staging, *staging.iterdir()]:
            os.chown(path, ssh.account.uid, ssh.account.gid)
        before = snapshot(staging)
        where, task = env.deliver(ref)
        assert where.state == "success", task.error
        series = check_delivered(ssh.remote, ref.id, files)
        after = snapshot(series)
        for src in files[:3]:
            assert after[src.name] == before[src.name], f"{src.name} was sent again"
        assert after[files[3].name] != before[files[3].name]

    def test_retry_after_publishing_but_before_the_record_sends_nothing(
        self, ssh: SSHTargetEnv
    ) -> None:
        """A crash between the rename and the task file: the retry finds its complete series."""
        files = ssh.series("series", 4)
        env = ssh.start()
        ref = env.job(files, "t")
        assert env.runtime is not None
        job_ref = env.where(ref)
        task = env.runtime.store.read(job_ref)
        job = DeliveryJob(ref.id, job_ref.path, sorted(job_ref.path.glob("*.dcm")), {}, task)
        assert sorted(env.runtime.target("t").send(job).delivered) == sorted(f.name for f in files)
        before = snapshot(ssh.remote)
        where, task = env.deliver(ref)  # the dispatcher never recorded the first send
        assert where.state == "success", task.error
        check_delivered(ssh.remote, ref.id, files)
        assert snapshot(ssh.remote) == before, "nothing may be sent twice"
        assert sorted(os.listdir(ssh.remote)) == [ref.id]

    def test_parallel_jobs_from_several_threads(self, ssh: SSHTargetEnv) -> None:
        env = ssh.start()
        jobs = [(env.job(ssh.series(f"s{i}", 12), "t"), i) for i in range(6)]
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
            check_delivered(ssh.remote, ref.id, sorted((ssh.tmp_path / f"s{i}").glob("*.dcm")))

    # -- test_connection ----------------------------------------------------------------------

    def test_connection_test(self, ssh: SSHTargetEnv) -> None:
        env = ssh.start()
        assert env.runtime is not None
        line = env.runtime.target("t").test_connection()
        assert "writable" in line
        self.check_connection_line(line, ssh.server)
        assert os.listdir(ssh.remote) == [], "the test leaves nothing behind"

    def test_connection_test_reports_a_refused_port(self, ssh: SSHTargetEnv) -> None:
        env = ssh.start(port=free_port())
        assert env.runtime is not None
        with pytest.raises(TargetError, match=self.refused_port_error):
            env.runtime.target("t").test_connection()


__all__ = ["SSHFolderDeliveryTests", "SSHFolderTargetSuite", "SSHTargetEnv"]
