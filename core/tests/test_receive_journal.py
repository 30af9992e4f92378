"""The receive journal: what it answered as stored reaches the spool, even across a crash."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mercure.jobs.incoming import IncomingSpool, instance_files, read_series_tags
from mercure.jobs.journal import ALIGN, ReceiveJournal, recover_all

SERIES = "1.2.3.4"


def _instance(i: int, size: int = 20_000) -> bytes:
    return bytes([i % 251]) * size + str(i).encode()


def _stored(spool: IncomingSpool) -> dict[str, bytes]:
    folder = spool.folder / SERIES
    if not folder.is_dir():
        return {}
    return {p.stem: p.read_bytes() for p in instance_files(folder)}


def _crashed_journal(spool: IncomingSpool, **kwargs: int) -> ReceiveJournal:
    """A journal whose materializer never runs: as if the process died right after answering."""
    journal = ReceiveJournal(spool, **kwargs)
    journal._run = lambda: None  # type: ignore[method-assign]
    journal.open()
    return journal


def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_instances_reach_their_series_folder_with_their_tags(tmp_path: Path) -> None:
    spool = IncomingSpool(tmp_path / "incoming")
    journal = ReceiveJournal(spool)
    journal.open()
    for i in range(40):
        journal.store(SERIES, f"1.2.{i}", [b"head", _instance(i)], {"Modality": "CT"})
    journal.close()
    stored = _stored(spool)
    assert sorted(stored) == sorted(f"1.2.{i}" for i in range(40))
    assert all(stored[f"1.2.{i}"] == b"head" + _instance(i) for i in range(40))
    assert read_series_tags(spool.folder / SERIES) == {"Modality": "CT"}
    assert list(spool.tmp.iterdir()) == []
    # Everything was checkpointed: a restart finds nothing to recover.
    assert ReceiveJournal(spool).open() == 0


def test_a_crash_before_materializing_loses_nothing(tmp_path: Path) -> None:
    spool = IncomingSpool(tmp_path / "incoming")
    crashed = _crashed_journal(spool)
    for i in range(5):
        crashed.store(SERIES, f"1.2.{i}", [_instance(i)], {"Modality": "MR"})
    assert _stored(spool) == {}  # only in the journal
    assert recover_all(spool) == 5
    assert _stored(spool) == {f"1.2.{i}": _instance(i) for i in range(5)}
    assert read_series_tags(spool.folder / SERIES) == {"Modality": "MR"}
    # Recovered once: the next start does not store them again.
    journal = ReceiveJournal(spool)
    assert journal.open() == 0
    journal.close()


def test_a_torn_record_is_skipped_and_the_records_after_it_recovered(tmp_path: Path) -> None:
    spool = IncomingSpool(tmp_path / "incoming")
    crashed = _crashed_journal(spool)
    for i in range(3):
        crashed.store(SERIES, f"1.2.{i}", [_instance(i)], {})
    segment = crashed.folder / "segment-0"
    # The middle record's write never completed (it was never answered): garble its data.
    with open(segment, "r+b") as fh:
        second = ALIGN + ((20_000 + 400) // ALIGN + 1) * ALIGN
        fh.seek(second + 2000)
        fh.write(b"\xff" * 100)
        fh.flush()
        os.fsync(fh.fileno())
    assert recover_all(spool) == 2
    assert sorted(_stored(spool)) == ["1.2.0", "1.2.2"]


def test_materialized_instances_are_not_recovered_again(tmp_path: Path) -> None:
    spool = IncomingSpool(tmp_path / "incoming")
    journal = ReceiveJournal(spool)
    journal.open()
    for i in range(3):
        journal.store(SERIES, f"1.2.{i}", [_instance(i)], {})
    _wait_for(lambda: len(_stored(spool)) == 3)
    _wait_for(lambda: all(not s.reserved for s in journal._segments))
    # Crash now (no close): the checkpoint already covers the three.
    for path in (spool.folder / SERIES).iterdir():
        path.unlink()
    (spool.folder / SERIES).rmdir()  # as if a router had taken and delivered the series
    assert recover_all(spool) == 0
    assert _stored(spool) == {}


def test_segments_are_reused_and_a_full_journal_falls_back_to_the_spool(tmp_path: Path) -> None:
    spool = IncomingSpool(tmp_path / "incoming")
    journal = ReceiveJournal(spool, segments=2, segment_bytes=256 * 1024)
    journal.open()
    for i in range(60):  # about 30 segments' worth: each is reused many times
        journal.store(SERIES, f"1.2.{i}", [_instance(i, 50_000)], {})
    journal.close()
    stored = _stored(spool)
    assert len(stored) == 60
    assert all(stored[f"1.2.{i}"] == _instance(i, 50_000) for i in range(60))
    # An instance larger than a segment goes straight to the spool, durably.
    journal = ReceiveJournal(spool, segments=2, segment_bytes=256 * 1024)
    journal.open()
    journal.store(SERIES, "1.2.big", [_instance(7, 400_000)], {})
    assert journal.bypassed == 1
    journal.close()
    assert _stored(spool)["1.2.big"] == _instance(7, 400_000)
