"""The DICOM receiver against bad input, access control and a full disk (real processes).

The router runs as a ``mercure run`` subprocess logging JSON lines to a file; the sending side
is pynetdicom, which can put any bytes on the wire: with ``STORE_SEND_CHUNKED_DATASET`` it
sends a file's dataset exactly as written after its file meta.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    DCMTK_ECHOSCU,
    DCMTK_STORESCU,
    MercureProcess,
    ProcessFactory,
    all_files,
    dcmtk_env,
    folder_of,
    raw_dicom_file,
    spool_config,
    target_instances,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import dataset_bytes, make_dataset, make_series
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

pytestmark = [pytest.mark.peer]

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORIZED = 0x0124


@pytest.fixture(autouse=True)
def _send_raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files' datasets as they are on disk (no decoding and re-encoding by pynetdicom)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@dataclass
class Router:
    proc: MercureProcess
    config: dict[str, Any]
    root: Path

    @property
    def port(self) -> int:
        return int(self.config["port"])

    @property
    def target(self) -> Path:
        return self.root / "target"

    def folder(self, name: str) -> Path:
        return folder_of(self.config, name)


def start_router(
    root: Path, processes: ProcessFactory, *, services: str = "", **overrides: Any
) -> Router:
    target = root / "target"
    target.mkdir(parents=True, exist_ok=True)
    receiver = {"bind_address": "127.0.0.1", **overrides.pop("dicom_receiver", {})}
    config = spool_config(
        root,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        dicom_receiver=receiver,
        **overrides,
    )
    path = write_config(root / "mercure.json", config)
    args = ["run", "--config", str(path)]
    if services:
        args += ["--only", services]
    return Router(processes.start("router", *args), config, root)


def associate(port: int, aet: str = "E2E-SCU") -> Association:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="MERCURE")


@contextlib.contextmanager
def association(port: int, aet: str = "E2E-SCU") -> Iterator[Association]:
    assoc = associate(port, aet)
    assert assoc.is_established, f"association from {aet} was not accepted"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def status_of(response: Any) -> int:
    assert "Status" in response, "no C-STORE response (the association was aborted)"
    return int(response.Status)


def refusals(router: Router) -> list[dict[str, Any]]:
    return [e for e in router.proc.events() if str(e.get("event", "")).startswith("refused")]


def assert_nothing_left_in_incoming(router: Router) -> None:
    incoming = router.folder("incoming")
    assert visible_entries(incoming) == [], "series folders left in incoming/"
    assert list((incoming / ".tmp").iterdir()) == [], "temporary files left in incoming/.tmp"


def wait_delivered(router: Router, names: set[str], timeout: float = 60) -> dict[str, list[str]]:
    def done() -> dict[str, list[str]] | None:
        found = target_instances(router.target)
        return found if names <= set(found) else None

    try:
        found: dict[str, list[str]] = wait_until(done, timeout, f"{sorted(names)} at the target")
        return found
    except AssertionError:
        print(router.proc.output())
        raise


# -- bad input -------------------------------------------------------------------------------


@dataclass
class BadInstance:
    path: Path
    sop_uid: str
    log_event: str  # the start of the receiver's log line that names the refusal
    escape_name: str = ""  # a path component the sender tried to escape the spool with


def _truncated(folder: Path) -> BadInstance:
    ds = make_dataset(generate_uid(), generate_uid(), 0, rows=64, columns=64)
    whole = folder / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    body = dataset_bytes(whole)
    pixels = len(ds.PixelData)
    assert body.endswith(ds.PixelData)
    cut = len(body) - pixels // 2  # in the middle of PixelData
    path = raw_dicom_file(
        folder / "truncated.dcm",
        CTImageStorage,
        ds.SOPInstanceUID,
        ExplicitVRLittleEndian,
        body[:cut],
    )
    return BadInstance(path, ds.SOPInstanceUID, "refused instance: malformed or truncated dataset")


def _without_series_uid(folder: Path) -> BadInstance:
    ds = make_dataset(generate_uid(), generate_uid(), 0)
    del ds.SeriesInstanceUID
    path = folder / "no-series.dcm"
    ds.save_as(path, enforce_file_format=True)
    return BadInstance(path, ds.SOPInstanceUID, "refused instance: no SeriesInstanceUID")


def _series_uid_escape(folder: Path) -> BadInstance:
    escape = f"e2e-escape-{uuid.uuid4().hex[:12]}"
    ds = make_dataset(generate_uid(), generate_uid(), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = f"../../../{escape}"
        path = folder / "escape.dcm"
        ds.save_as(path, enforce_file_format=True)
    return BadInstance(
        path, ds.SOPInstanceUID, "refused instance: invalid SeriesInstanceUID", escape
    )


def _sop_uid_escape(folder: Path) -> BadInstance:
    escape = f"e2e-escape-{uuid.uuid4().hex[:12]}"
    sop_uid = f"../../../{escape}"
    ds = make_dataset(generate_uid(), generate_uid(), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        path = folder / "escape-sop.dcm"
        ds.save_as(path, enforce_file_format=True)
    return BadInstance(path, sop_uid, "refused instance: invalid SOP Instance UID", escape)


def _not_dicom(folder: Path) -> BadInstance:
    sop_uid = generate_uid()
    payload = random.Random(20260101).randbytes(8192)
    path = raw_dicom_file(
        folder / "random.dcm", CTImageStorage, sop_uid, ExplicitVRLittleEndian, payload
    )
    return BadInstance(path, sop_uid, "refused instance")


BAD_INPUTS: dict[str, Callable[[Path], BadInstance]] = {
    "truncated-pixel-data": _truncated,
    "no-series-uid": _without_series_uid,
    "series-uid-with-dotdot": _series_uid_escape,
    "sop-uid-with-dotdot": _sop_uid_escape,
    "random-bytes": _not_dicom,
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_instance_is_refused_and_the_receiver_keeps_serving(
    kind: str, tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = start_router(tmp_path / "router", mercure_processes)
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = BAD_INPUTS[kind](crafted)
    good = make_series(tmp_path / "good", 2)
    before = all_files(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with association(router.port) as assoc:
            bad_response = assoc.send_c_store(bad.path)
            bad_status = status_of(bad_response)
            same_assoc_status = status_of(assoc.send_c_store(good[0]))
        with association(router.port) as assoc:
            new_assoc_status = status_of(assoc.send_c_store(good[1]))

    assert bad_status == CANNOT_UNDERSTAND, f"bad instance answered 0x{bad_status:04X}"
    assert str(bad_response.get("ErrorComment", "")).strip(), "the refusal carries no comment"
    assert same_assoc_status == SUCCESS, "a good instance after a bad one was not stored"
    assert new_assoc_status == SUCCESS, "a good instance on a new association was not stored"

    # The refusal is logged, with what was refused and from whom.
    events = [e for e in refusals(router) if str(e["event"]).startswith(bad.log_event)]
    assert events, f"no '{bad.log_event}' log line:\n{router.proc.output()}"
    assert events[0]["level"] == "warning"
    assert events[0].get("sender") == "E2E-SCU@127.0.0.1"
    assert bad.sop_uid in (events[0].get("sop_uid"), events[0].get("uid"))

    # The good instances are routed and delivered, byte for byte.
    found = wait_delivered(router, {p.name for p in good})
    for path in good:
        (task_id,) = found[path.name]
        assert dataset_bytes(router.target / task_id / path.name) == dataset_bytes(path)
    wait_until(lambda: visible_entries(router.folder("outgoing")) == [], 30, "outgoing/ to empty")

    # Nothing of the bad instance was kept anywhere, and nothing left the spool.
    assert_nothing_left_in_incoming(router)
    new_files = all_files(tmp_path) - before
    allowed = (router.folder("success"), router.target)
    for path in new_files:
        if path.suffix == ".log":
            continue
        assert any(path.is_relative_to(a) for a in allowed), f"unexpected file {path}"
        assert path.name not in (f"{bad.sop_uid}.dcm", bad.path.name), f"bad instance at {path}"
    if bad.escape_name:
        hits = [p for p in tmp_path.parent.rglob(f"*{bad.escape_name}*")]
        assert hits == [], f"the sender escaped the spool: {hits}"
    assert len(found) == 2
    assert router.proc.terminate() == 0


# -- verification and access control ---------------------------------------------------------


def test_c_echo_answers_success(tmp_path: Path, mercure_processes: ProcessFactory) -> None:
    router = start_router(tmp_path, mercure_processes, services="receiver")
    with association(router.port) as assoc:
        assert status_of(assoc.send_c_echo()) == SUCCESS
    echo = subprocess.run(
        [str(DCMTK_ECHOSCU), "-aet", "ECHOSCU", "-aec", "MERCURE", "127.0.0.1", str(router.port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr.decode()
    assert router.proc.terminate() == 0


def test_allowed_calling_aets_rejects_other_senders(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    router = start_router(
        tmp_path / "router",
        mercure_processes,
        dicom_receiver={"allowed_calling_aets": ["MODALITY1"]},
    )
    intruder, allowed = make_series(tmp_path / "series", 2)

    assoc = associate(router.port, aet="INTRUDER")
    try:
        assert assoc.is_rejected, "an association from a calling AET not in the list was accepted"
    finally:
        if assoc.is_established:
            assoc.release()
    sent = subprocess.run(
        [
            *(str(DCMTK_STORESCU), "-aet", "INTRUDER", "-aec", "MERCURE"),
            *("127.0.0.1", str(router.port), str(intruder)),
        ],
        env=dcmtk_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode != 0, "DCMTK storescu from INTRUDER succeeded"

    with association(router.port, aet="MODALITY1") as assoc:
        assert status_of(assoc.send_c_store(allowed)) == SUCCESS

    found = wait_delivered(router, {allowed.name})
    assert intruder.name not in found
    assert not [p for p in all_files(tmp_path / "router") if p.name == intruder.name]
    assert router.proc.terminate() == 0


def test_allowed_addresses_refuses_c_store_from_elsewhere(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    router = start_router(
        tmp_path / "router",
        mercure_processes,
        services="receiver",
        dicom_receiver={"allowed_addresses": ["192.0.2.10"]},
    )
    (instance,) = make_series(tmp_path / "series", 1)
    with association(router.port) as assoc:
        assert status_of(assoc.send_c_store(instance)) == NOT_AUTHORIZED
    # The refusal is synchronous: had anything been kept, it would be on disk by now.
    assert_nothing_left_in_incoming(router)
    assert not [p for p in all_files(tmp_path / "router") if p.name == instance.name]
    events = [e for e in refusals(router) if "allowed_addresses" in str(e["event"])]
    assert events, router.proc.output()
    assert events[0]["sender"] == "E2E-SCU@127.0.0.1"
    assert router.proc.terminate() == 0


# -- full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(folder: Path, size: str = "1m") -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["/usr/bin/mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        unmounted = subprocess.run(["/usr/bin/umount", str(folder)], check=False, timeout=60)
        if unmounted.returncode != 0:  # still busy: detach it rather than leave it mounted
            subprocess.run(["/usr/bin/umount", "-l", str(folder)], check=True, timeout=60)


def fill(folder: Path) -> Path:
    """Write a hidden file into ``folder`` until its filesystem is full."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_full_disk_answers_out_of_resources_until_space_returns(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    root = tmp_path / "router"
    incoming = root / "spool" / "incoming"
    with tiny_tmpfs(incoming):
        router = start_router(root, mercure_processes)
        try:
            first, second = make_series(tmp_path / "series", 2, rows=128, columns=128)
            filler = fill(incoming)

            with association(router.port) as assoc:
                assert status_of(assoc.send_c_store(first)) == OUT_OF_RESOURCES
                # Still full: the next one is refused the same way, and nothing half-written stays.
                assert status_of(assoc.send_c_store(second)) == OUT_OF_RESOURCES
            assert_nothing_left_in_incoming(router)
            events = router.proc.events()
            errors = [e for e in events if str(e.get("event", "")).startswith("cannot store")]
            assert len(errors) == 2, router.proc.output()
            assert errors[0]["level"] == "error"
            assert "space" in errors[0]["error"].lower(), errors[0]

            filler.unlink()  # space returns
            with association(router.port) as assoc:
                assert status_of(assoc.send_c_store(first)) == SUCCESS
            with association(router.port) as assoc:
                assert status_of(assoc.send_c_store(second)) == SUCCESS

            found = wait_delivered(router, {first.name, second.name})
            for path in (first, second):
                (task_id,) = found[path.name]
                assert dataset_bytes(router.target / task_id / path.name) == dataset_bytes(path)
            assert router.proc.terminate() == 0
        finally:
            router.proc.kill()  # before the unmount; a no-op once it stopped
