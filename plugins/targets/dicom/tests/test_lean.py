"""The lean C-STORE sender against DCMTK's storescp: bytes, PDU sizes, statuses, aborts.

The other test files run through the lean sender too (it is the default); these pin what is
specific to it: the PDUs it writes, the switch back to pynetdicom, the asynchronous window,
and large instances.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import DcmtkStoreSCP, dataset_bytes, free_port, make_dataset, make_series
from mercure_target_dicom import DicomTarget, DicomTargetConfig, lean, wire
from mercure_target_dicom.sender import Peer, Sender
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

pytestmark = pytest.mark.peer


def job_for(files: list[Path]) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="pacs"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task)


def storescp(tmp_path: Path, *extra: str, name: str = "storescp") -> DcmtkStoreSCP:
    return DcmtkStoreSCP(tmp_path / name, free_port(), extra_args=tuple(extra)).start()


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[DcmtkStoreSCP] = []

    def start(*extra: str) -> DcmtkStoreSCP:
        scp = storescp(tmp_path, *extra, name=f"storescp{len(started)}")
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def target(port: int, **extra: Any) -> DicomTarget:
    fields: dict[str, Any] = {"ip": "127.0.0.1", "port": str(port), "aet_target": "STORESCP"}
    fields.update(extra)
    return DicomTarget("pacs", DicomTargetConfig(**fields))


def by_uid(scp: DcmtkStoreSCP) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.received()
    }


def assert_identical(sent: list[Path], scp: DcmtkStoreSCP) -> None:
    received = by_uid(scp)
    assert len(received) == len(sent)
    for path in sent:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path), f"{path.name} changed"


class _Tap:
    """Wraps an association's socket and keeps what was written, to parse the PDUs."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sent = bytearray()

    def sendall(self, data: Any) -> None:
        self.sent += bytes(data)
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def taps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[lean.LeanAssociation, _Tap]]:
    """Every lean association of the test, with a tap on the bytes it wrote."""
    seen: list[tuple[lean.LeanAssociation, _Tap]] = []
    original = lean.LeanAssociation.__init__

    def init(self: lean.LeanAssociation, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        tap = _Tap(self.sock)
        self.sock = tap  # type: ignore[assignment]
        seen.append((self, tap))

    monkeypatch.setattr(lean.LeanAssociation, "__init__", init)
    return seen


def pdus(stream: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(stream):
        kind, _, length = struct.unpack_from(">BBI", stream, pos)
        out.append((kind, stream[pos + 6 : pos + 6 + length]))
        pos += 6 + length
    assert pos == len(stream)
    return out


# -- what arrives ---------------------------------------------------------------------------


@pytest.mark.parametrize("lean_sender", [True, False])
def test_datasets_arrive_byte_identical_on_either_path(
    tmp_path: Path, scp_factory: Any, taps: list[Any], lean_sender: bool
) -> None:
    scp = scp_factory()
    files = [
        *make_series(tmp_path / "a", 5, transfer_syntax=ExplicitVRLittleEndian),
        *make_series(tmp_path / "b", 3, transfer_syntax=ImplicitVRLittleEndian),
    ]
    result = target(scp.port, lean_sender=lean_sender).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files), result.failed
    assert_identical(files, scp)
    assert len(taps) == (1 if lean_sender else 0)


def test_the_switch_turns_the_lean_sender_off(
    tmp_path: Path, scp_factory: Any, taps: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scp = scp_factory()
    files = make_series(tmp_path / "s", 3)
    monkeypatch.setenv(lean.ENV_SWITCH, "0")
    assert len(target(scp.port).send(job_for(files)).delivered) == 3
    assert taps == []
    monkeypatch.setenv(lean.ENV_SWITCH, "1")
    scp2 = scp_factory()
    assert len(target(scp2.port).send(job_for(files)).delivered) == 3
    assert len(taps) == 1


def test_pdus_fragment_to_the_peers_max_pdu(
    tmp_path: Path, scp_factory: Any, taps: list[Any]
) -> None:
    scp = scp_factory("--max-pdu", "4096")
    files = make_series(tmp_path / "s", 4, rows=128, columns=128)  # 32 KiB of pixels each
    result = target(scp.port).send(job_for(files))
    assert len(result.delivered) == 4, result.failed
    assert_identical(files, scp)

    assoc, tap = taps[0]
    assert assoc.fragment == 4096 - 6
    written = [(kind, body) for kind, body in pdus(bytes(tap.sent)) if kind == wire.P_DATA_TF]
    assert all(len(body) <= 4096 for _, body in written)
    # Per instance: one command PDV (last), then dataset PDVs of which only the final one is
    # marked last; together they are exactly the stored dataset.
    messages: list[bytes] = []
    dataset = bytearray()
    commands = 0
    for _, body in written:
        for context_id, mch, fragment in wire.iter_pdvs(body):
            assert context_id == 1
            if mch & wire.MCH_COMMAND:
                assert mch & wire.MCH_LAST
                commands += 1
                assert wire.parse_command(fragment).command == 0x0001
            else:
                dataset += fragment
                if mch & wire.MCH_LAST:
                    messages.append(bytes(dataset))
                    dataset = bytearray()
    assert commands == 4
    assert sorted(messages) == sorted(dataset_bytes(f) for f in files)
    assert max(len(b) for _, b in written) == 4096  # full-sized PDUs, not just small ones


# -- statuses and aborts ----------------------------------------------------------------------


def test_failure_status_from_a_refusing_storescp_keeps_instances_pending(
    tmp_path: Path, dispatch_env: Any
) -> None:
    out = tmp_path / "refusing"
    scp = storescp(tmp_path, name="refusing")
    try:
        out.rmdir()  # storescp checked it at start; now it answers 0xA700 (out of resources)
        files = make_series(tmp_path / "series", 4)
        entry = {"target_type": "dicom", "ip": "127.0.0.1", "port": str(scp.port)}
        env = dispatch_env.start({"pacs": {**entry, "aet_target": "STORESCP"}})
        ref = env.job(files, "pacs")
        ref, task = env.deliver(ref)
        assert ref.state == "outgoing"
        failed = task.dispatch_state.failed["pacs"]
        assert set(failed) == {f.name for f in files}
        assert all(
            r.startswith("status 0xA700 (Refused: Out of Resources)") for r in failed.values()
        )

        out.mkdir()  # the peer recovers: the retry delivers everything, byte-identical
        ref, task = env.deliver(ref)
        assert ref.state == "success"
        assert_identical(files, scp)
    finally:
        scp.stop()


@pytest.mark.parametrize("option", ["--abort-after", "--abort-during"])
def test_peer_abort_mid_send_fails_the_rest_for_retry(
    tmp_path: Path, scp_factory: Any, option: str
) -> None:
    scp = scp_factory(option)
    files = make_series(tmp_path / "s", 3, rows=512, columns=512)  # 0.5 MB: abort mid-write
    result = target(scp.port).send(job_for(files))
    assert result.delivered == []
    assert set(result.failed) == {f.name for f in files}
    assert result.error is not None and "will be retried" in result.error
    assert "aborted the association" in result.error or "connection was closed" in result.error


def test_refused_association_is_explained(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory("--refuse")
    with pytest.raises(TargetError, match="association rejected"):
        target(scp.port).send(job_for(make_series(tmp_path / "s", 1)))


# -- asynchronous operations --------------------------------------------------------------------


def test_outstanding_requests_only_when_the_peer_grants_a_window(
    tmp_path: Path, recording_scp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_series(tmp_path / "s", 12)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    most: list[int] = []
    original = lean.LeanSession._answer

    def answer(self: lean.LeanSession, open_requests: dict[int, Any], outcome: Any) -> None:
        most.append(len(open_requests))
        original(self, open_requests, outcome)

    monkeypatch.setattr(lean.LeanSession, "_answer", answer)

    # pynetdicom answers every proposal with a window of 1: one request at a time.
    scp = recording_scp(fail={uids[3]: 0xA700})
    result = target(scp.port, aet_target="RECORDER", async_operations=4).send(job_for(files))
    assert len(result.delivered) == 11 and list(result.failed) == [files[3].name]
    assert max(most) == 1

    # A peer granting 4 outstanding operations (pynetdicom's answer made to grant them).
    from pynetdicom.acse import ACSE
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

    def grant(self: Any) -> AsynchronousOperationsWindowNegotiation:
        item = AsynchronousOperationsWindowNegotiation()
        item.maximum_number_operations_invoked = 4
        item.maximum_number_operations_performed = 1
        return item

    monkeypatch.setattr(ACSE, "_check_async_ops", grant)
    most.clear()
    scp = recording_scp(fail={uids[3]: 0xA700})
    result = target(scp.port, aet_target="RECORDER", async_operations=8).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for i, f in enumerate(files) if i != 3)
    assert result.failed[files[3].name].startswith("status 0xA700")
    assert max(most) == 4
    for path in files:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        if uid != uids[3]:
            assert scp.datasets[uid] == dataset_bytes(path)


# -- large instances ----------------------------------------------------------------------------


def write_large_instance(path: Path, frames: int, rows: int = 512, columns: int = 512) -> Path:
    """A multi-frame instance written frame by frame (never whole in memory)."""
    ds = make_dataset(generate_uid(), generate_uid(), 0, rows=rows, columns=columns)
    ds.NumberOfFrames = frames
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (rows * columns * 2 // 256)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * len(frame)))
        for i in range(frames):
            fh.write(frame[i % 256 :] + frame[: i % 256])
    return path


def digest(path: Path) -> str:
    with open(path, "rb") as fh:
        offset = wire.dataset_offset(fh)
        fh.seek(offset)
        sha = hashlib.sha256()
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


@pytest.mark.slow
def test_a_256_mib_instance_arrives_intact(tmp_path: Path, scp_factory: Any) -> None:
    scp = scp_factory()
    (tmp_path / "big").mkdir()
    path = write_large_instance(tmp_path / "big" / "big.dcm", frames=512)
    assert path.stat().st_size > 256 * 1024 * 1024
    peer = Peer("127.0.0.1", scp.port, "STORESCP", "MERCURE", timeout=60)
    outcome = Sender(peer).send([path])
    assert outcome.delivered == [path.name], outcome.failed
    [got] = scp.received()
    assert digest(got) == digest(path)
