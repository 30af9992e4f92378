"""Malformed protocol data is refused without large allocations, and real senders go on.

Each case runs while DCMTK's ``storescu`` sends a series and while another association, opened
before, stays open: the series must be stored whole and the open association must still store
an instance after the case.
"""

from __future__ import annotations

import contextlib
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    OTHER_HOST,
    RawPeer,
    dataset_header,
    deeply_nested,
    element,
    many_contexts_rq,
    random_bytes,
    running_receiver,
    store_pdus,
    stored_sop_uids,
)
from mercure.builtin.dicom_receiver import DicomReceiver
from mercure.testing import dcmtk_storescu, make_dataset, make_series
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

pytestmark = [
    pytest.mark.peer,
    # A receiver thread that dies of an exception is a failure, not a warning.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
STREAMED = 16 * 1024 * 1024  # what a peer sends after announcing a huge PDU


@dataclass
class Outcome:
    """What the receiver did to the hostile peer."""

    answers: list[str]  # PDU names received before the connection ended (or the statuses)
    counter: str  # the refusal counter that must have gone up by one
    peak_bytes: int = 0  # traced allocation peak of the whole process during the case
    refused_uid: str = ""  # an instance that must not be stored
    stored_uid: str = ""  # a good instance sent after it on the same association


def _stream_after(peer: RawPeer, header: bytes) -> None:
    """Send ``header`` and then up to 16 MiB, for as long as the receiver takes them."""
    chunk = bytes(65536)
    with contextlib.suppress(OSError):
        peer.send(header)
        for _ in range(STREAMED // len(chunk)):
            peer.send(chunk)


def _answers(peer: RawPeer) -> list[str]:
    return [pdu.name for pdu in peer.read_all()]


def random_first_pdu(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    peer.send(b"\xa5" + random_bytes(20260101, 8191))
    return Outcome(_answers(peer), "refused_malformed_request")


def http_request(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    peer.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return Outcome(_answers(peer), "refused_malformed_request")


def huge_first_pdu(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    tracemalloc.start()
    try:
        _stream_after(peer, b"\x01\x00\xff\xff\xff\xff")
        answers = _answers(peer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return Outcome(answers, "refused_malformed_request", peak)


def huge_p_data_pdu(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    assert peer.associate().name == "A-ASSOCIATE-AC"
    tracemalloc.start()
    try:
        _stream_after(peer, b"\x04\x00\xff\xff\xff\xff")
        answers = _answers(peer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return Outcome(["A-ASSOCIATE-AC", *answers], "refused_pdu_too_large", peak)


def thousands_of_contexts(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    request = many_contexts_rq(5000, realistic=False)
    assert len(request) < 256 * 1024  # refused for the count, not for the length
    peer.send(request)
    return Outcome(_answers(peer), "refused_malformed_request")


def thousands_of_real_contexts(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    with contextlib.suppress(OSError):  # the receiver may stop reading after the header
        peer.send(many_contexts_rq(10000, realistic=True))
    return Outcome(_answers(peer), "refused_malformed_request")


def _store_on_raw(port: int, body: bytes) -> Outcome:
    """A C-STORE of ``body`` after the routing elements, then a good one, on one association."""
    peer = RawPeer(port, OTHER_HOST)
    try:
        assert peer.associate().name == "A-ASSOCIATE-AC"
        bad_uid = generate_uid()
        for pdu in store_pdus(dataset_header(bad_uid) + body, bad_uid):
            peer.send(pdu)
        bad = peer.store_status()
        good_uid = generate_uid()
        good = dataset_header(good_uid) + element(0x0010, 0x0010, b"PN", b"GOOD^ONE")
        for pdu in store_pdus(good, good_uid, message_id=2):
            peer.send(pdu)
        answers = [f"0x{bad:04X}", f"0x{peer.store_status():04X}"]
    finally:
        peer.close()
    return Outcome(answers, "", refused_uid=bad_uid, stored_uid=good_uid)


def dataset_length_beyond_data(port: int) -> Outcome:
    return _store_on_raw(port, element(0x7FE0, 0x0010, b"OW", b"\x01" * 100, length=0xFFFFFFF0))


def deeply_nested_sequences(port: int) -> Outcome:
    return _store_on_raw(port, deeply_nested(10000))


def garbage_dimse_command(port: int) -> Outcome:
    peer = RawPeer(port, OTHER_HOST)
    assert peer.associate().name == "A-ASSOCIATE-AC"
    garbage = random_bytes(7, 300)
    pdv = (len(garbage) + 2).to_bytes(4, "big") + b"\x01\x03" + garbage  # command, last
    peer.send(b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv)
    return Outcome(["A-ASSOCIATE-AC", *_answers(peer)], "refused_malformed_message")


CASES: dict[str, tuple[Callable[[int], Outcome], list[str]]] = {
    "random-bytes": (random_first_pdu, ["A-ABORT"]),
    "http-request": (http_request, ["A-ABORT"]),
    "4-GiB-first-PDU": (huge_first_pdu, ["A-ABORT"]),
    "4-GiB-P-DATA-PDU": (huge_p_data_pdu, ["A-ASSOCIATE-AC", "A-ABORT"]),
    "5000-presentation-contexts": (thousands_of_contexts, ["A-ABORT"]),
    "10000-presentation-contexts-640-KiB": (thousands_of_real_contexts, ["A-ABORT"]),
    "dataset-length-beyond-data": (dataset_length_beyond_data, ["0xC000", "0x0000"]),
    "10000-nested-sequences": (deeply_nested_sequences, ["0xC000", "0x0000"]),
    "garbage-dimse-command": (garbage_dimse_command, ["A-ASSOCIATE-AC", "A-ABORT"]),
}


def _open_association(port: int) -> Any:
    ae = AE(ae_title="STEADY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MERCURE")
    assert assoc.is_established
    return assoc


def _store(assoc: Any) -> tuple[int, str]:
    ds = make_dataset(generate_uid(), generate_uid(), 0)
    status = assoc.send_c_store(ds)
    return int(status.Status), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_refused_and_other_associations_go_on(case: str, tmp_path: Path) -> None:
    run, expected = CASES[case]
    series = make_series(tmp_path / "series", 40)
    receiver: DicomReceiver
    with running_receiver(tmp_path / "router") as receiver:
        steady = _open_association(receiver.port)
        try:
            before = _store(steady)
            sent: dict[str, Any] = {}
            sender = threading.Thread(
                target=lambda: sent.update(
                    result=dcmtk_storescu(series, receiver.port, check=False, aet="MODALITY")
                )
            )
            sender.start()
            outcome = run(receiver.port)
            after = _store(steady)
            sender.join(120)
        finally:
            steady.release()
        stats = receiver.stats.snapshot()
        stored = stored_sop_uids(receiver)

    assert outcome.answers == expected, f"{case}: the receiver answered {outcome.answers}"
    if outcome.counter:
        assert stats[outcome.counter] == 1, stats
    if outcome.peak_bytes:
        # The 16 MiB sent after the announcement were not buffered.
        assert outcome.peak_bytes < 4 * 1024 * 1024, f"peak {outcome.peak_bytes} bytes"
    # The association that was open all along, and the sender next to it, did not notice.
    assert before[0] == SUCCESS and after[0] == SUCCESS
    result = sent["result"]
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected_uids = {p.stem for p in series} | {before[1], after[1]}
    if outcome.stored_uid:
        expected_uids.add(outcome.stored_uid)
    assert stored == expected_uids
    assert outcome.refused_uid not in stored
