"""Delivery with rsync over ssh to a real sshd: logins, host keys, layout, retries, the hook."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import DispatchEnv, free_port, make_series
from mercure.testing_ssh import check_delivered, fingerprint_of, make_keypair, snapshot

pytestmark = pytest.mark.peer


def deliver_once(env: DispatchEnv, files: list[Path], tags: dict[str, str] | None = None):
    ref = env.job(files, "t", tags)
    where, task = env.deliver(ref)
    return ref, where, task


# -- logins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("login", ["key", "password", "passphrase", "private_key"])
def test_logins_deliver_in_mercures_layout(
    login, dispatch_env, settings, remote, ssh_account, tmp_path, monkeypatch
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
        monkeypatch.setenv("TEST_RSYNC_PASSPHRASE", ssh_account.passphrase)
        target = settings(
            key_file=None,
            private_key=f"${{file:{ssh_account.encrypted_key}}}",
            key_passphrase="${env:TEST_RSYNC_PASSPHRASE}",
        )
    files = make_series(tmp_path / "series", 7)
    env = dispatch_env.start({"t": target})
    ref, where, task = deliver_once(env, files)
    assert where.state == "success", task.error
    check_delivered(remote, ref.id, files)


@pytest.mark.parametrize("login", ["password", "key", "passphrase"])
def test_wrong_credentials_go_to_error_at_once(
    login, dispatch_env, settings, ssh_account, remote, tmp_path
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
    assert "login failed" in (task.error or "")
    assert os.listdir(remote) == []


def test_missing_rsync_program_is_a_configuration_error(dispatch_env, settings, tmp_path):
    env = dispatch_env.start({"t": settings(rsync_path="/nonexistent/rsync")})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error"
    assert "'/nonexistent/rsync' is not installed" in (task.error or "")
    assert "apt-get install rsync" in (task.error or "")


# -- host keys ------------------------------------------------------------------------------


def test_unknown_host_is_refused_with_its_fingerprint(
    dispatch_env, settings, openssh_server, tmp_path
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    env = dispatch_env.start({"t": settings(known_hosts=str(empty))})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error"
    assert "is not known" in (task.error or "")
    assert openssh_server.fingerprint in (task.error or "")
    assert empty.read_text() == ""


def test_changed_host_key_is_refused(dispatch_env, settings, own_server, remote, tmp_path):
    known = own_server.write_known_hosts(tmp_path / "kh")
    old = own_server.fingerprint
    env = dispatch_env.start({"t": settings(server=own_server, known_hosts=str(known))})
    ref, where, task = deliver_once(env, make_series(tmp_path / "a", 1))
    assert where.state == "success", task.error
    own_server.restart(new_host_key=True)
    _ref, where, task = deliver_once(env, make_series(tmp_path / "b", 1))
    assert where.state == "error"
    error = task.error or ""
    assert "CHANGED" in error and own_server.fingerprint in error and old not in error
    assert str(known) in error
    assert sorted(os.listdir(remote)) == [ref.id]


def test_pinned_fingerprint(dispatch_env, settings, openssh_server, remote, tmp_path) -> None:
    files = make_series(tmp_path / "series", 2)
    env = dispatch_env.start(
        {"t": settings(known_hosts=None, host_key_fingerprint=openssh_server.fingerprint)}
    )
    ref, where, task = deliver_once(env, files)
    assert where.state == "success", task.error
    check_delivered(remote, ref.id, files)


def test_wrong_pinned_fingerprint_is_refused(dispatch_env, settings, openssh_server, tmp_path):
    make_keypair(tmp_path / "other")
    pin = fingerprint_of((tmp_path / "other.pub").read_text())
    env = dispatch_env.start({"t": settings(known_hosts=None, host_key_fingerprint=pin)})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error"
    assert pin in (task.error or "") and openssh_server.fingerprint in (task.error or "")


def test_trust_on_first_use_pins_the_key(dispatch_env, settings, own_server, remote, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"
    env = dispatch_env.start(
        {"t": settings(server=own_server, known_hosts=str(known), trust_on_first_use=True)}
    )
    _ref, where, task = deliver_once(env, make_series(tmp_path / "a", 1))
    assert where.state == "success", task.error
    pinned = known.read_text()
    assert own_server.host_public_key in pinned
    _ref, where, task = deliver_once(env, make_series(tmp_path / "b", 1))
    assert where.state == "success", task.error
    assert known.read_text() == pinned, "pinned once, not again"
    own_server.restart(new_host_key=True)
    _ref, where, task = deliver_once(env, make_series(tmp_path / "c", 1))
    assert where.state == "error" and "CHANGED" in (task.error or "")


# -- the remote folder ----------------------------------------------------------------------


def test_missing_base_folder_is_a_configuration_error(dispatch_env, settings, remote, tmp_path):
    env = dispatch_env.start({"t": settings(folder=str(remote / "nope"))})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error" and "does not exist" in (task.error or "")


def test_permission_denied_goes_to_error_at_once(dispatch_env, settings, ssh_account, tmp_path):
    locked = ssh_account.folder(f"locked-{uuid.uuid4().hex[:6]}", owned=False)
    env = dispatch_env.start({"t": settings(folder=str(locked))})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error"
    assert "permission denied" in (task.error or "").lower()
    assert os.listdir(locked) == []


def test_patterns_lay_out_by_tags(dispatch_env, settings, remote, tmp_path) -> None:
    files = make_series(tmp_path / "series", 4, PatientID="P 'x'; $(id)")
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
    series = remote / "P 'x'; $(id)" / first.StudyInstanceUID / first.SeriesInstanceUID
    assert sorted(os.listdir(series)) == [".complete", "1"]
    for src in files:
        uid = pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
        assert (series / "1" / f"{uid}.dcm").read_bytes() == src.read_bytes()
    assert not [n for n in os.listdir(series.parent) if n.startswith(".")]


def test_a_series_folder_taken_by_another_job_gets_its_own_name(
    dispatch_env, settings, remote, tmp_path
) -> None:
    env = dispatch_env.start({"t": settings(folder_pattern="{SeriesInstanceUID}")})
    first = make_series(tmp_path / "a", 2, series_uid="1.2.3.4")
    second = make_series(tmp_path / "b", 3, series_uid="1.2.3.4")
    tags = {"SeriesInstanceUID": "1.2.3.4"}
    ref1, where, task = deliver_once(env, first, tags)
    assert where.state == "success", task.error
    ref2, where, task = deliver_once(env, second, tags)
    assert where.state == "success", task.error
    check_delivered(remote, ref1.id, first, folder="1.2.3.4")
    check_delivered(remote, ref2.id, second, folder=f"1.2.3.4_{ref2.id}")


@pytest.mark.parametrize("problem", ["unreadable", "same path"])
def test_a_series_that_would_be_incomplete_is_not_sent(
    problem, dispatch_env, settings, remote, tmp_path
) -> None:
    """An instance that cannot be sent fails the job at once; nothing appears on the server."""
    import shutil

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
    assert os.listdir(remote) == []


# -- retries --------------------------------------------------------------------------------


def test_retry_resumes_a_staging_folder_without_resending(
    dispatch_env, settings, remote, ssh_account, tmp_path
) -> None:
    """What a broken try left in the staging folder: complete files stay, the rest is sent,
    and rsync's hidden temporary file of the broken try is not published."""
    files = make_series(tmp_path / "series", 6)
    env = dispatch_env.start({"t": settings()})
    ref = env.job(files, "t")
    staging = remote / f".{ref.id}.partial"
    staging.mkdir()
    for src in files[:3]:
        dest = staging / src.name
        dest.write_bytes(src.read_bytes())
        st = src.stat()
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync --times left it
    (staging / files[3].name).write_bytes(files[3].read_bytes()[:100])  # cut short
    (staging / f".{files[4].name}.Ab12Cd").write_bytes(b"rsync temp")  # a broken temp file
    for path in [staging, *staging.iterdir()]:
        os.chown(path, ssh_account.uid, ssh_account.gid)
    before = snapshot(staging)
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    series = check_delivered(remote, ref.id, files)
    after = snapshot(series)
    for src in files[:3]:
        assert after[src.name] == before[src.name], f"{src.name} was sent again"
    assert after[files[3].name] != before[files[3].name]


def test_retry_after_publishing_but_before_the_record_sends_nothing(
    dispatch_env, settings, remote, tmp_path
) -> None:
    files = make_series(tmp_path / "series", 4)
    env = dispatch_env.start({"t": settings()})
    ref = env.job(files, "t")
    assert env.runtime is not None
    job_ref = env.where(ref)
    task = env.runtime.store.read(job_ref)
    job = DeliveryJob(ref.id, job_ref.path, sorted(job_ref.path.glob("*.dcm")), {}, task)
    assert sorted(env.runtime.target("t").send(job).delivered) == sorted(f.name for f in files)
    before = snapshot(remote)
    where, task = env.deliver(ref)  # the dispatcher never recorded the first send
    assert where.state == "success", task.error
    check_delivered(remote, ref.id, files)
    assert snapshot(remote) == before, "nothing may be sent twice"
    assert sorted(os.listdir(remote)) == [ref.id]


def test_parallel_jobs_from_several_threads(dispatch_env, settings, remote, tmp_path) -> None:
    env = dispatch_env.start({"t": settings()})
    jobs = [(env.job(make_series(tmp_path / f"s{i}", 10), "t"), i) for i in range(6)]
    assert env.dispatcher is not None
    threads = [
        threading.Thread(target=env.dispatcher.deliver, args=(env.where(ref),)) for ref, _ in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for ref, i in jobs:
        assert env.where(ref).state == "success"
        check_delivered(remote, ref.id, sorted((tmp_path / f"s{i}").glob("*.dcm")))


# -- run_on_complete ------------------------------------------------------------------------

HOOK = """#!/bin/sh
# Record the arguments and how many instances the series folder held when this ran.
printf '%s|%s\\n' "$*" "$(ls "$1" | grep -c '\\.dcm$')" >> "$(dirname "$0")/hook.log"
exit "$(cat "$(dirname "$0")/hook.exit" 2>/dev/null || echo 0)"
"""


def install_hook(remote: Path, account, exit_code: int = 0) -> Path:
    script = remote / "mercure_complete.sh"
    script.write_text(HOOK)
    script.chmod(0o755)
    (remote / "hook.exit").write_text(str(exit_code))
    for path in (script, remote / "hook.exit"):
        os.chown(path, account.uid, account.gid)
    return remote / "hook.log"


def test_run_on_complete_runs_mercure_complete_sh(
    dispatch_env, settings, remote, ssh_account, tmp_path
) -> None:
    log = install_hook(remote, ssh_account)
    files = make_series(tmp_path / "series", 5)
    env = dispatch_env.start({"t": settings(run_on_complete=True)})
    ref, where, task = deliver_once(env, files)
    assert where.state == "success", task.error
    assert log.read_text() == f"{remote / ref.id} rsync t {ref.id}|5\n"


def test_a_failing_hook_is_retried_without_sending_again(
    dispatch_env, settings, remote, ssh_account, tmp_path
) -> None:
    log = install_hook(remote, ssh_account, exit_code=3)
    files = make_series(tmp_path / "series", 3)
    env = dispatch_env.start({"t": settings(run_on_complete=True)})
    ref, where, task = deliver_once(env, files)
    assert where.state == "outgoing", "a failing hook is retried"
    assert task.dispatch_state is not None
    assert "mercure_complete.sh on" in str(task.dispatch_state.attempts[-1].error)
    assert "(exit 3)" in str(task.dispatch_state.attempts[-1].error)
    before = snapshot(remote / ref.id)
    (remote / "hook.exit").write_text("0")
    where, task = env.deliver(ref)
    assert where.state == "success", task.error
    assert snapshot(remote / ref.id) == before
    assert log.read_text().splitlines() == [f"{remote / ref.id} rsync t {ref.id}|3"] * 2


def test_a_missing_hook_is_a_configuration_error(dispatch_env, settings, remote, tmp_path):
    env = dispatch_env.start({"t": settings(run_on_complete=True)})
    _ref, where, task = deliver_once(env, make_series(tmp_path / "series", 1))
    assert where.state == "error"
    assert "mercure_complete.sh" in (task.error or "") and "not retried" in (task.error or "")


# -- test_connection ------------------------------------------------------------------------


def test_connection_test(dispatch_env, settings, remote) -> None:
    env = dispatch_env.start({"t": settings()})
    assert env.runtime is not None
    line = env.runtime.target("t").test_connection()
    assert "writable" in line and "rsync" in line and "version" in line
    assert os.listdir(remote) == []


def test_connection_test_reports_a_refused_port(dispatch_env, settings) -> None:
    env = dispatch_env.start({"t": settings(port=free_port())})
    assert env.runtime is not None
    with pytest.raises(TargetError, match="refused"):
        env.runtime.target("t").test_connection()
