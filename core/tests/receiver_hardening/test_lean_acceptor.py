"""The lean storage acceptor: which associations it serves, and datasets larger than memory."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hostile import running_receiver, stored_sop_uids
from mercure.builtin import dicom_store_scp
from mercure.builtin.dicom_store_wire import IMPLEMENTATION_CLASS_UID
from mercure.jobs.incoming import IncomingSpool
from mercure.testing_dicom import dcmtk_storescu, make_dataset, make_series


def _stored_files(spool: IncomingSpool) -> dict[str, Path]:
    return {p.stem: p for p in spool.folder.glob("*/*.dcm")}


def test_plain_storage_associations_are_served_by_the_lean_acceptor(tmp_path: Path) -> None:
    series = make_series(tmp_path / "series", 3)
    with running_receiver(tmp_path) as receiver:
        dcmtk_storescu(series, receiver.port)
        files = _stored_files(receiver.spool)
    assert set(files) == {p.stem for p in series}
    for path in files.values():
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


def test_the_lean_acceptor_can_be_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dicom_store_scp.LEAN_ENV, "0")
    series = make_series(tmp_path / "series", 2)
    with running_receiver(tmp_path) as receiver:
        dcmtk_storescu(series, receiver.port)
        files = _stored_files(receiver.spool)
    assert set(files) == {p.stem for p in series}
    for path in files.values():
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID != IMPLEMENTATION_CLASS_UID  # pynetdicom's


@pytest.mark.slow
def test_an_instance_larger_than_the_memory_limit_streams_to_disk_intact(tmp_path: Path) -> None:
    # 1800 x 1800 x 16 bit = 6.5 MB of pixel data: above SPILL_BYTES, so it is spilled.
    ds = make_dataset("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 1,
                      rows=1800, columns=1800)  # fmt: skip
    assert len(ds.PixelData) > dicom_store_scp.SPILL_BYTES
    source = tmp_path / "big.dcm"
    ds.save_as(source, enforce_file_format=True)
    small = make_series(tmp_path / "small", 2)
    with running_receiver(tmp_path) as receiver:
        dcmtk_storescu([source, *small], receiver.port)
        files = _stored_files(receiver.spool)
        assert stored_sop_uids(receiver) >= {p.stem for p in small}
    stored = pydicom.dcmread(files[str(ds.SOPInstanceUID)])
    assert stored.PixelData == ds.PixelData
    assert stored.SeriesInstanceUID == ds.SeriesInstanceUID
    assert list((receiver.spool.tmp).iterdir()) == []


def test_a_durable_receiver_stores_through_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERCURE_RECEIVE_JOURNAL", "1")
    from mercure.builtin.dicom_receiver import dicom_receiver_for
    from mercure.testing_router import config_for

    config = config_for(tmp_path, dicom_receiver={"bind_address": "127.0.0.1"})
    receiver = dicom_receiver_for(config, IncomingSpool(config.folder("incoming"), fsync=True))
    receiver.start()
    series = make_series(tmp_path / "series", 4)
    try:
        assert receiver.journal is not None
        dcmtk_storescu(series, receiver.port)
    finally:
        receiver.stop()  # materializes what is journaled
    files = _stored_files(receiver.spool)
    assert set(files) == {p.stem for p in series}
    for source in series:
        assert pydicom.dcmread(files[source.stem]).PixelData == pydicom.dcmread(source).PixelData
