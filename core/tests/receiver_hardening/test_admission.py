"""Connections that never ask for an association, and senders that stop, cannot block real ones.

The real sender is DCMTK's ``storescu``; the hostile peers are raw sockets, most of them from a
second loopback address (127.0.0.2), which the receiver sees as another host.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    OTHER_HOST,
    IdleFlood,
    RawPeer,
    dataset_header,
    element,
    running_receiver,
    spool_files,
    store_pdus,
    stored_sop_uids,
    wait_until,
)
from mercure.testing import config_for, dcmtk_storescu, make_series, start_router, wait_for
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

pytestmark = [
    pytest.mark.peer,
    # A receiver thread that dies of an exception is a failure, not a warning.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

SUCCESS = 0x0000


def _storescu_ok(files: list[Path], port: int, **kwargs: Any) -> None:
    result = dcmtk_storescu(files, port, check=False, **kwargs)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"storescu failed:\n{output}"
    assert "reject" not in output.lower(), output


def _rejected(port: int, source: str = "127.0.0.1") -> bool:
    """Does the receiver answer an association request with A-ASSOCIATE-RJ?

    Read off the wire: pynetdicom's requestor reports an association as aborted, not
    rejected, when the rejection arrives before it has looked at its own connection.
    """
    peer = RawPeer(port, source)
    try:
        return peer.associate().name == "A-ASSOCIATE-RJ"
    finally:
        peer.close()


def _associate(port: int, source: str = "127.0.0.1", aet: str = "PEER") -> Association:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="MERCURE", bind_address=(source, 0))


@pytest.mark.slow
def test_500_idle_connections_reopened_do_not_stop_a_100_instance_series(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        dicom_receiver={"bind_address": "127.0.0.1"},
    )
    series = make_series(tmp_path / "series", 100)
    runs = start_router(config)
    router = next(runs)
    try:
        receiver = router.supervisor.receivers[0]
        with IdleFlood(router.port, 500) as flood:
            # The receiver keeps closing the flood's surplus, and the flood keeps re-opening.
            wait_until(lambda: flood.reopened >= 500, 60, "the flood to re-open 500 times")
            _storescu_ok(series, router.port, aet="MODALITY")
            reopened_during_transfer = flood.reopened
        stats = receiver.stats.snapshot()
        wait_for(
            lambda: {p.name for p in target.rglob("*.dcm")} >= {p.name for p in series},
            timeout=60,
            what="all 100 instances at the folder target",
        )
    finally:
        with contextlib.suppress(StopIteration):
            next(runs)
    assert reopened_during_transfer >= 500
    assert stats["connections_accepted"] >= 1000
    assert stats["refused_pending_per_address"] >= 500
    assert stats["refused_association_limit"] == 0
    assert stats["associations_admitted"] >= 1


def test_listed_sender_gets_through_while_another_address_holds_500_connections(
    tmp_path: Path,
) -> None:
    settings = {
        "allowed_addresses": ["127.0.0.1"],
        "max_pending_connections": 500,
        "max_pending_per_address": 1000,
        "max_associations": 4,
    }
    with running_receiver(tmp_path, **settings) as receiver:
        port = receiver.port
        # The other address also takes every association slot its kind may have ...
        held = [_associate(port, OTHER_HOST) for _ in range(4)]
        try:
            assert all(a.is_established for a in held)
            assert _rejected(port, OTHER_HOST), "a fifth association from an unlisted address"
            # ... and keeps 500 connections open that never ask for anything.
            with IdleFlood(port, 500) as flood:
                wait_until(
                    lambda: receiver.stats.snapshot()["connections_pending"] == 500,
                    30,
                    "500 pending connections",
                )
                series = make_series(tmp_path / "series", 10)
                _storescu_ok(series, port, aet="MODALITY")
                assert flood.reopened == 0, "connections of the other address were closed"
            assert stored_sop_uids(receiver) >= {p.stem for p in series}
        finally:
            for assoc in held:
                assoc.release()
        stats = receiver.stats.snapshot()
    assert stats["refused_association_limit"] == 1


def test_connections_without_a_request_are_closed_after_the_timeout(tmp_path: Path) -> None:
    with running_receiver(tmp_path, association_request_timeout=1) as receiver:
        silent = RawPeer(receiver.port, OTHER_HOST)
        slow = RawPeer(receiver.port, OTHER_HOST)
        slow.send(b"\x01\x00\x00\x00\x01\x00")  # an A-ASSOCIATE-RQ header, and then nothing
        assert silent.is_closed_by_peer()
        assert slow.is_closed_by_peer()
        assert receiver.stats.snapshot()["refused_request_timeout"] == 2
        assert receiver.stats.snapshot()["associations_admitted"] == 0
        # Closing them did not stop the port.
        _storescu_ok(make_series(tmp_path / "series", 2), receiver.port)


def test_oldest_idle_connection_of_an_address_makes_room_for_a_new_one(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_pending_per_address=3) as receiver:
        peers = []
        for i in range(5):
            peers.append(RawPeer(receiver.port, OTHER_HOST))
            wait_until(
                lambda n=i + 1: receiver.stats.snapshot()["connections_accepted"] == n,
                10,
                f"{i + 1} connections",
            )
        # The two oldest were closed for the two newest; the three newest still wait.
        assert peers[0].is_closed_by_peer()
        assert peers[1].is_closed_by_peer()
        assert receiver.stats.snapshot()["connections_pending"] == 3
        assert peers[4].associate(calling="LATE").name == "A-ASSOCIATE-AC"
        assert receiver.stats.snapshot()["refused_pending_per_address"] == 2


def test_busiest_address_gives_way_when_all_waiting_places_are_taken(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_pending_connections=4) as receiver:
        busy = []
        for i in range(4):
            busy.append(RawPeer(receiver.port, OTHER_HOST))
            wait_until(
                lambda n=i + 1: receiver.stats.snapshot()["connections_pending"] == n, 10, "pending"
            )
        newcomer = RawPeer(receiver.port, "127.0.0.3")
        assert busy[0].is_closed_by_peer(), "the busiest address's oldest connection was kept"
        assert newcomer.associate().name == "A-ASSOCIATE-AC"
        stats = receiver.stats.snapshot()
    assert stats["refused_pending_total"] == 1


def test_association_slots_per_address(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_associations_per_address=2) as receiver:
        first, second = _associate(receiver.port), _associate(receiver.port)
        try:
            assert _rejected(receiver.port)
            elsewhere = _associate(receiver.port, OTHER_HOST)
            assert elsewhere.is_established, "another address was refused a slot"
            elsewhere.release()
        finally:
            first.release()
            second.release()
        assert receiver.stats.snapshot()["refused_association_limit_per_address"] == 1


def _half_a_store(peer: RawPeer, sop_uid: str, mid_pdu: bool) -> None:
    """The command and the first half of a C-STORE's dataset, cut between or inside PDUs."""
    body = dataset_header(sop_uid) + element(0x7FE0, 0x0010, b"OW", b"\x07" * 65536)
    pdus = store_pdus(body, sop_uid, max_pdu=4096)
    assert len(pdus) > 4
    for pdu in pdus[: len(pdus) // 2]:
        peer.send(pdu)
    if mid_pdu:
        cut = pdus[len(pdus) // 2]
        peer.send(cut[: len(cut) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stops-between-pdus", "stops-mid-pdu", "drips"])
def test_sender_stalling_mid_dataset_is_cut_off_and_its_slot_freed(
    tmp_path: Path, how: str
) -> None:
    with running_receiver(tmp_path, max_associations=1, network_timeout=2) as receiver:
        stalled = RawPeer(receiver.port)
        assert stalled.associate().name == "A-ASSOCIATE-AC"
        sop_uid = generate_uid()
        _half_a_store(stalled, sop_uid, mid_pdu=how == "stops-mid-pdu")
        dripping = threading.Event()
        if how == "drips":  # one byte of the next PDU a second: never a whole PDU

            def drip() -> None:
                pdu = store_pdus(b"\0" * 8000, sop_uid, max_pdu=4096)[-1]
                for byte in pdu:
                    if dripping.wait(1):
                        return
                    with contextlib.suppress(OSError):
                        stalled.send(bytes([byte]))

            threading.Thread(target=drip, daemon=True).start()
        try:
            # The stalled association holds the only slot ...
            assert _rejected(receiver.port)
            # ... until the receiver cuts it off: no answer ever came for the half instance.
            answers = stalled.read_all()
            assert [p.name for p in answers if p.name == "P-DATA-TF"] == []
            wait_until(
                lambda: receiver.stats.snapshot()["associations_active"] == 0,
                60,
                "the slot to be free",
            )
        finally:
            dripping.set()
            stalled.close()
        assert sop_uid not in stored_sop_uids(receiver)
        assert not [p for p in spool_files(receiver) if sop_uid in p.name]
        series = make_series(tmp_path / "series", 3)
        _storescu_ok(series, receiver.port)
        assert stored_sop_uids(receiver) >= {p.stem for p in series}
        stats = receiver.stats.snapshot()
    if how != "stops-between-pdus":  # pynetdicom's own network timeout sees to that one
        assert stats["refused_stalled"] == 1
    assert stats["refused_association_limit"] == 1


def test_refusals_are_logged_with_the_source_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_receiver(tmp_path, max_pending_per_address=1) as receiver:
        first = RawPeer(receiver.port, OTHER_HOST)
        wait_until(lambda: receiver.stats.snapshot()["connections_pending"] == 1, 10, "pending")
        RawPeer(receiver.port, OTHER_HOST)
        assert first.is_closed_by_peer()
    out = capsys.readouterr()
    lines = [
        line
        for line in (out.out + out.err).splitlines()
        if "refused connection" in line and OTHER_HOST in line
    ]
    assert lines, out.out + out.err
    assert "pending_per_address" in lines[0]
