"""Fuzzing the receiver's PDU and dataset handling with hypothesis: no crash, no hang.

Three targets, each a bounded number of cases (``MERCURE_FUZZ_EXAMPLES`` scales them;
``MERCURE_FUZZ_RANDOM=1`` explores new cases instead of CI's fixed ones):

* the first-PDU check of the admission gate, on bent A-ASSOCIATE-RQs and random bytes: it
  accepts (and then pynetdicom can decode the request) or raises ``MalformedPDU``;
* the dataset check the receiver runs before parsing an instance: it passes or raises
  ``TruncatedDatasetError``;
* a running receiver, fed bent requests and P-DATA over real sockets: every connection ends,
  every answer is a valid PDU, no receiver thread dies, and afterwards a real sender is served
  and every connection and association is accounted for.

Each test prints its case count and outcome, so they show in CI's log.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip(
    "hypothesis", reason="hypothesis is not installed: uv sync (it is a dev dependency)"
)
from hostile import (  # noqa: E402
    RawPeer,
    associate_rq,
    dataset_header,
    deeply_nested,
    element,
    running_receiver,
    store_pdus,
    wait_until,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mercure.builtin.dicom_pdu import MalformedPDU, check_associate_rq  # noqa: E402
from mercure.builtin.dicom_receiver import DicomReceiver  # noqa: E402
from mercure.dicomstream import TruncatedDatasetError, check_dataset  # noqa: E402
from mercure.testing import dataset_bytes, dcmtk_storescu, make_dataset, make_series  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

pytestmark = [
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

SCALE = float(os.environ.get("MERCURE_FUZZ_EXAMPLES", "1"))
FIXED = os.environ.get("MERCURE_FUZZ_RANDOM", "") != "1"


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=FIXED,
        database=None,
        deadline=None,  # hangs are caught by pytest-timeout, not by timing each case
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def report(capsys: pytest.CaptureFixture[str], name: str, outcomes: collections.Counter) -> None:
    total = sum(outcomes.values())
    parts = ", ".join(f"{count} {what}" for what, count in sorted(outcomes.items()))
    with capsys.disabled():
        print(f"\nfuzz {name}: {total} cases ({parts}); no crash, no hang")


@st.composite
def bent(draw: Any, bases: list[bytes], header: int = 6) -> bytes:
    """One of ``bases`` with a few bytes overwritten, cut, inserted or repeated."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["set", "set16", "set32", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set":
            data[pos : pos + 1] = bytes([draw(st.integers(0, 255))])
        elif op == "set16":
            data[pos : pos + 2] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
        elif op == "set32":
            data[pos : pos + 4] = struct.pack(">L", draw(st.integers(0, 0xFFFFFFFF)))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            end = min(len(data), pos + draw(st.integers(1, 256)))
            data[pos:pos] = data[pos:end] * draw(st.integers(1, 20))
    if header and len(data) >= header and draw(st.booleans()):
        data[2:6] = struct.pack(">L", len(data) - 6)  # a consistent length: look deeper
    return bytes(data)


RQ_BASES = [
    associate_rq(),
    associate_rq(
        calling="MODALITY",
        contexts=[
            (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            (MRImageStorage, [ExplicitVRLittleEndian]),
            ("1.2.840.10008.1.1", [ImplicitVRLittleEndian]),
        ],
    ),
]


def test_fuzz_first_pdu_check(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes: collections.Counter = collections.Counter()

    @fuzz_settings(3000)
    @given(st.one_of(bent(RQ_BASES), st.binary(max_size=512)))
    def case(data: bytes) -> None:
        try:
            request = check_associate_rq(data)
        except MalformedPDU as exc:
            assert 0 <= exc.abort_reason <= 6
            outcomes["refused"] += 1
            return
        assert len(request.calling_ae) <= 16 and len(request.called_ae) <= 16
        outcomes["accepted"] += 1

    case()
    assert outcomes["accepted"] and outcomes["refused"]
    report(capsys, "A-ASSOCIATE-RQ check", outcomes)


# Fixed UIDs: the same bytes in every run, so that CI's cases are the same every time.
UID = "1.2.826.0.1.3680043.9.7.2.1"


def _dataset_bases() -> list[tuple[bytes, str]]:
    bases = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ds = make_dataset(UID + ".1", UID + ".2", 0, rows=4, columns=4)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID + ".3"
        item = Dataset()
        item.ReferencedSOPInstanceUID = UID + ".4"
        item.ReferencedSOPClassUID = CTImageStorage
        ds.ReferencedImageSequence = Sequence([item, item])
        ds.file_meta.TransferSyntaxUID = syntax
        bases.append((_encode(ds), str(syntax)))
    bases.append((dataset_header(UID) + deeply_nested(40), str(ExplicitVRLittleEndian)))
    bases.append(
        (
            dataset_header(UID) + element(0x7FE0, 0x0010, b"OB", b"\x00" * 64),
            str(ExplicitVRLittleEndian),
        )
    )
    return bases


def _encode(ds: Dataset) -> bytes:
    """The dataset as its transfer syntax encodes it (pydicom writes files only)."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fh:
        syntax = ds.file_meta.TransferSyntaxUID
        ds.save_as(
            fh.name,
            enforce_file_format=True,
            implicit_vr=syntax == ImplicitVRLittleEndian,
            little_endian=syntax != ExplicitVRBigEndian,
        )
        return dataset_bytes(Path(fh.name))


DATASET_BASES = _dataset_bases()


def test_fuzz_dataset_check(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes: collections.Counter = collections.Counter()
    streams = [data for data, _ in DATASET_BASES]
    syntaxes = sorted({syntax for _, syntax in DATASET_BASES})

    @fuzz_settings(3000)
    @given(st.one_of(bent(streams, header=0), st.binary(max_size=512)), st.sampled_from(syntaxes))
    def case(data: bytes, syntax: str) -> None:
        try:
            check_dataset(data, syntax)
        except TruncatedDatasetError:
            outcomes["refused"] += 1
            return
        outcomes["passed"] += 1

    case()
    assert outcomes["passed"] and outcomes["refused"]
    report(capsys, "dataset check", outcomes)


# -- a running receiver -------------------------------------------------------------------------


def _p_data_bases() -> list[bytes]:
    body = dataset_header(UID) + element(0x7FE0, 0x0010, b"OW", b"\x01" * 3000)
    pdus = store_pdus(body, UID, max_pdu=1024)
    return [pdus[0], pdus[1], pdus[-1], b"".join(pdus[:3]), b"".join(pdus)]


P_DATA_BASES = _p_data_bases()
OTHER_PDUS = [
    b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-RELEASE-RQ
    b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-ABORT
    b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # A-RELEASE-RP, unexpected
]


@st.composite
def conversation(draw: Any) -> tuple[bytes, list[bytes], bool]:
    valid = st.sampled_from(RQ_BASES)
    first = draw(st.one_of(valid, valid, bent(RQ_BASES), st.binary(max_size=256)))
    later = draw(
        st.lists(
            st.one_of(
                st.sampled_from(P_DATA_BASES),
                bent(P_DATA_BASES),
                st.sampled_from(OTHER_PDUS),
                st.binary(max_size=64),
            ),
            max_size=4,
        )
    )
    close_write = draw(st.booleans())
    return first, later, close_write


@pytest.fixture(scope="module")
def fuzzed_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomReceiver]:
    root = tmp_path_factory.mktemp("fuzzed")
    with running_receiver(
        root, association_request_timeout=0.5, network_timeout=0.5, max_pdu=16384
    ) as receiver:
        yield receiver


def _receiver_threads() -> int:
    names = ("AcceptorThread", "run_reactor", "process_request_thread")
    return sum(1 for t in threading.enumerate() if any(n in t.name for n in names))


@pytest.mark.slow
@pytest.mark.peer
def test_fuzz_running_receiver(
    fuzzed_receiver: DicomReceiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = fuzzed_receiver
    outcomes: collections.Counter = collections.Counter()

    @fuzz_settings(150)
    @given(conversation())
    def case(talk: tuple[bytes, list[bytes], bool]) -> None:
        first, later, close_write = talk
        peer = RawPeer(receiver.port, timeout=30)
        try:
            answers = []
            try:
                with contextlib.suppress(OSError):
                    peer.send(first)
                answer = peer.read_pdu()
                if answer is not None:
                    answers.append(answer)
                    with contextlib.suppress(OSError):
                        for pdu in later if answer.name == "A-ASSOCIATE-AC" else []:
                            peer.send(pdu)
                        if close_write:
                            peer.sock.shutdown(socket.SHUT_WR)
                    # The receiver ends the connection by itself: a peer that stopped
                    # sending is not kept for longer than the timeouts allow.
                    answers += peer.read_all()
            except TimeoutError:
                raise AssertionError("the receiver kept a silent connection for 30 s") from None
            for pdu in answers:
                assert 0x01 <= pdu.pdu_type <= 0x07, f"not a PDU: type 0x{pdu.pdu_type:02X}"
            names = [p.name for p in answers]
            outcomes["answered " + ("+".join(dict.fromkeys(names)) or "nothing")] += 1
        finally:
            peer.close()

    case()
    # Everything the cases opened is gone, and the port still serves a real sender.
    wait_until(
        lambda: (
            receiver.stats.snapshot()["connections_pending"] == 0
            and receiver.stats.snapshot()["associations_active"] == 0
        ),
        60,
        "every connection and association to end",
    )
    wait_until(lambda: _receiver_threads() == 0, 60, "the association threads to end")
    series = make_series(tmp_path / "series", 5)
    result = dcmtk_storescu(series, receiver.port, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    stats = receiver.stats.snapshot()
    assert stats["connections_accepted"] >= sum(outcomes.values())
    report(capsys, "running receiver", outcomes)
