"""Whole series with rsync over ssh: a watching reader, a killed server, secrets kept secret."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import pytest
from mercure.testing import (
    OpenSSHServer,
    config_for,
    dataset_bytes,
    dcmtk_storescu,
    make_series,
    processes_containing,
    start_router,
    wait_for,
)
from mercure.testing_ssh import SeriesWatcher, check_delivered, snapshot

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def test_300_instances_through_the_router_never_show_a_partial_series(
    settings, remote: Path, tmp_path: Path
) -> None:
    """Receiver, router, dispatcher, this target; a reader lists the destination throughout."""
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
            jobs = wait_for(lambda: list(success.iterdir()), timeout=120, what="job in success/")
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
    dispatch_env, settings, own_server: OpenSSHServer, remote: Path, tmp_path: Path
) -> None:
    """Kill the server (and every session) with a third of the series up: the next try sends
    only what is missing, and no reader ever sees the series before it is whole."""
    files = make_series(tmp_path / "series", 300, rows=256, columns=256)
    known = own_server.write_known_hosts(tmp_path / "kh")
    env = dispatch_env.start({"t": settings(server=own_server, known_hosts=str(known))})
    ref = env.job(files, "t")
    staging = remote / f".{ref.id}.partial"
    killed = threading.Event()

    def kill_when_a_third_is_up() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if len([n for n in os.listdir(staging) if not n.startswith(".")]) >= 100:
                    own_server.kill()
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
        own_server.start()  # same port, same host key
        where, task = env.deliver(ref)
    finally:
        watcher.stop()
    assert where.state == "success", task.error
    series = check_delivered(remote, ref.id, files)
    up_after = snapshot(series)
    resent = [name for name, ident in up_before.items() if up_after[name] != ident]
    assert resent == [], f"complete files uploaded again: {resent[:5]}"
    assert watcher.incomplete == [], watcher.incomplete[:5]


def test_no_password_or_key_material_in_logs_task_files_or_processes(
    dispatch_env, settings, ssh_account, remote: Path, tmp_path: Path, capfd, monkeypatch
) -> None:
    """While rsync and ssh run, no process shows the password, the passphrase or the key in
    its command line or environment; logs and the spool do not hold them either."""
    secrets = [ssh_account.password, ssh_account.passphrase]
    key_text = ssh_account.encrypted_key.read_text()
    key_body = "".join(key_text.splitlines()[1:3])
    files = make_series(tmp_path / "series", 150, rows=128, columns=128)
    hits: list[str] = []
    ours: set[str] = set()  # our ssh/rsync processes the scan saw: proof it looked
    stop = threading.Event()

    def watch_processes() -> None:
        while not stop.is_set():
            for secret in [*secrets, key_body]:
                hits.extend(processes_containing(secret))
            ours.update(processes_containing("mercure-rsync-"))
            time.sleep(0.005)

    monkeypatch.setenv("TEST_RSYNC_PASSWORD", ssh_account.password)
    private = set(Path(tempfile.gettempdir()).glob("mercure-rsync-*"))
    watcher = threading.Thread(target=watch_processes)
    watcher.start()
    try:
        env = dispatch_env.start(
            {
                # From the environment: ssh and rsync must not inherit that variable.
                "pw": settings(key_file=None, password="${env:TEST_RSYNC_PASSWORD}"),
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
    assert any(" ssh " in hit or "/ssh " in hit for hit in ours), sorted(ours)[:5]
    assert any("rsync" in hit for hit in ours), sorted(ours)[:5]
    assert hits == []
    out, err = capfd.readouterr()
    assert "login failed" in out + err
    spool_text = b"".join(
        p.read_bytes()
        for p in (tmp_path / "spool").rglob("*")
        if p.is_file() and p.suffix != ".dcm"
    )
    for secret in [*secrets, key_body, ssh_account.password + "x"]:
        assert secret not in out + err
        assert secret.encode() not in spool_text
    leftovers = set(Path(tempfile.gettempdir()).glob("mercure-rsync-*")) - private
    assert leftovers == set(), "the private folders (askpass socket, key copy) are removed"
