"""DICOM test data and DCMTK peers: synthetic series, storescp, storescu, a C-STORE SCU."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mercure.testing_peers import PeerProcess as PeerProcess
from mercure.testing_peers import port_accepts as port_accepts
from mercure.testing_postgres import PostgresServer as PostgresServer
from mercure.testing_ssh import OpenSSHServer as OpenSSHServer
from mercure.testing_ssh import SSHAccount as SSHAccount
from mercure.testing_ssh import processes_containing as processes_containing

if TYPE_CHECKING:
    pass


DCMTK_BIN = Path(os.environ.get("MERCURE_DCMTK_BIN", "/usr/bin"))


def make_dataset(
    series_uid: str,
    study_uid: str,
    index: int,
    *,
    rows: int = 16,
    columns: int = 16,
    modality: str = "CT",
    series_description: str = "synthetic",
    sop_class: str = CTImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags: Any,
) -> Dataset:
    """One synthetic instance with pixel data (uncompressed, 16 bit)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Patient"
    ds.PatientID = "MRN0001"
    ds.AccessionNumber = "ACC0001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260101"
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SliceThickness = "1.0"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((index + i) % 251 for i in range(rows * columns * 2))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def make_series(
    folder: Path, count: int = 10, *, series_uid: str | None = None, **kwargs: Any
) -> list[Path]:
    """Write ``count`` instances of one new series into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = kwargs.pop("study_uid", None) or generate_uid()
    paths = []
    for i in range(count):
        ds = make_dataset(series_uid, study_uid, i, **kwargs)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta: what was sent."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


@dataclass
class DcmtkStoreSCP:
    """DCMTK's ``storescp`` writing received instances into ``folder``."""

    folder: Path
    port: int
    aet: str = "STORESCP"
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()

    def start(self) -> DcmtkStoreSCP:
        exe = DCMTK_BIN / "storescp"
        if not exe.exists():
            pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [
                str(exe),
                "-aet",
                self.aet,
                "-od",
                str(self.folder),
                "-uf",
                "+B",
                *self.extra_args,
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"storescp exited early: {err}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def dcmtk_storescu(
    files: list[Path] | Path,
    port: int,
    *,
    aec: str = "MERCURE",
    aet: str = "STORESCU",
    extra: tuple[str, ...] = (),
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Send files (or a folder, recursively) with DCMTK's ``storescu`` over one association."""
    exe = DCMTK_BIN / "storescu"
    if not exe.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    args = [str(exe), "-aet", aet, "-aec", aec, *extra]
    if isinstance(files, Path):
        args += ["+sd", "+r", "127.0.0.1", str(port), str(files)]
    else:
        args += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(
        args,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        check=check,
        timeout=timeout,
    )


def store_instances(
    files: Sequence[Path],
    port: int,
    *,
    aec: str = "MERCURE",
    aet: str = "STORESCU",
    host: str = "127.0.0.1",
) -> None:
    """Send DICOM files over one association with pynetdicom (no DCMTK needed).

    Fails the test if the association is refused or any instance is not stored with status
    Success, naming the file and the status.
    """
    from pydicom import dcmread
    from pynetdicom import AE

    from mercure.dimse_tuning import keep_responses_from_reactor

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=aet)
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    if len(contexts) > 128:
        pytest.fail(f"{len(contexts)} presentation contexts needed; an association has 128")
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=aec)
    if not assoc.is_established:
        pytest.fail(f"association with {aec} at {host}:{port} was not established")
    keep_responses_from_reactor(assoc)  # pynetdicom's own race would cost a DIMSE timeout
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                shown = "no answer" if code is None else f"0x{code:04X}"
                pytest.fail(f"C-STORE of {path.name} to {host}:{port} ended with {shown}")
    finally:
        assoc.release()
