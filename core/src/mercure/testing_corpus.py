"""A corpus of real-world-like DICOM files, and the reference of what DCMTK receives of it.

The files are the test files pydicom ships (and those of the ``pydicom-data`` package when it
is installed): compressed syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE), deflate, explicit big
endian, private tags and sequences, many character sets, RT, SR and waveform objects, written
by several vendors' tools. Two files are made here: an encapsulated PDF and an instance of a
private SOP class. Several files carry the same SOP Instance UID (one image in many syntaxes),
so :func:`batches` splits what was received into sends without duplicates.

:func:`reference_receive` sends every file on its own with ``dcmsend`` to DCMTK's
``storescp +xa +B --promiscuous`` (mercure's receiver with ``accept_compressed_images``, bit
preserving) and keeps what arrives; a file it does not take is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from mercure.testing_dicom import DCMTK_BIN, DcmtkStoreSCP, dataset_bytes, make_dataset
from mercure.testing_peers import free_port

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
#: A SOP class no dictionary knows: received because the receiver is promiscuous.
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7.9999.1"
_NOT_DICOM = {".txt", ".json", ".icc", ".gz", ".dump", ".py"}


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Received:
    """What a receiver wrote for one corpus file."""

    source: CorpusFile
    path: Path
    transfer_syntax: str
    dataset: bytes
    #: The SOP Instance UID the sender put in the C-STORE (a broken file may garble it).
    sop_uid: str

    @property
    def uids(self) -> frozenset[str]:
        """The UIDs that may name this instance at a receiver: sent, and in the file."""
        return frozenset({self.sop_uid, self.source.sop_uid})


def _pydicom_folders() -> list[Path]:
    import pydicom.data

    root = Path(pydicom.data.__file__).parent
    folders = [root / "test_files", root / "charset_files"]
    try:  # pydicom-data: the larger files pydicom otherwise downloads
        from pydicom.data.data_manager import external_data_sources

        folders += [Path(src.data_path) for src in external_data_sources().values()]
    except Exception:
        pass
    return [f for f in folders if f.is_dir()]


def _describe(path: Path) -> CorpusFile | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", ""))
    if not sop_class or not sop_uid:
        return None
    return CorpusFile(path, sop_class, sop_uid, syntax)


def _made_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pdf = make_dataset(generate_uid(), generate_uid(), 0, sop_class=ENCAPSULATED_PDF)
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelData",
        "SliceThickness",
    ):
        delattr(pdf, keyword)
    pdf.Modality = "DOC"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.DocumentTitle = "report"
    body = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    pdf.EncapsulatedDocument = body + (b"\0" if len(body) % 2 else b"")
    private = make_dataset(
        generate_uid(), generate_uid(), 0, sop_class=PRIVATE_SOP_CLASS, modality="OT"
    )
    block = private.private_block(0x0029, "MERCURE TEST", create=True)
    block.add_new(0x10, "LO", "private value")
    block.add_new(0x11, "UN", b"\x01\x02\x03\x04")
    paths = []
    for name, ds in (("made_encapsulated_pdf.dcm", pdf), ("made_private_sop_class.dcm", private)):
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def corpus(folder: Path) -> list[CorpusFile]:
    """The corpus: pydicom's files (copied into ``folder``) and the files made here."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = [
            p
            for src in _pydicom_folders()
            for p in sorted(src.iterdir())
            if p.is_file() and p.suffix.lower() not in _NOT_DICOM
        ]
        for src_path in candidates + _made_files(folder / "made"):
            name = (
                src_path.name
                if src_path.name not in seen
                else f"{src_path.parent.name}_{src_path.name}"
            )
            seen.add(name)
            path = src_path if src_path.is_relative_to(folder) else folder / name
            if path != src_path:
                shutil.copyfile(src_path, path)
            described = _describe(path)
            if described is not None:
                files.append(described)
    return files


def batches(files: Iterable[Received]) -> list[list[Received]]:
    """Split ``files`` into groups in which no SOP Instance UID names two instances."""
    groups: list[list[Received]] = []
    for f in files:
        for group in groups:
            if all(not (g.uids & f.uids) for g in group):
                group.append(f)
                break
        else:
            groups.append([f])
    return groups


def instance_uids(path: Path) -> frozenset[str]:
    """The SOP Instance UIDs of a received file: of its file meta, and of its dataset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
    return frozenset(u for u in (meta, str(ds.get("SOPInstanceUID", ""))) if u)


def split_file(path: Path) -> tuple[str, bytes]:
    """(Transfer Syntax UID of the file meta, the encoded dataset after it)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.TransferSyntaxUID), dataset_bytes(path)


def dcmsend(
    files: Sequence[Path], port: int, *, aec: str = "MERCURE", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK's ``dcmsend`` (mercure's dicom target) over one association."""
    exe = DCMTK_BIN / "dcmsend"
    return subprocess.run(
        [str(exe), "-aet", "CORPUS", "-aec", aec, "-nuc", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reference_receive(
    files: Sequence[CorpusFile], workdir: Path
) -> tuple[list[Received], list[tuple[CorpusFile, str]]]:
    """Send each file alone to ``storescp +xa +B --promiscuous``: (received, [(skipped, why)])."""
    incoming = workdir / "incoming"
    kept = workdir / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    scp = DcmtkStoreSCP(incoming, free_port(), aet="MERCURE", extra_args=("+xa", "--promiscuous"))
    scp.start()
    received: list[Received] = []
    skipped: list[tuple[CorpusFile, str]] = []
    try:
        for i, f in enumerate(files):
            result = dcmsend([f.path], scp.port)
            arrived = scp.received()
            if not arrived:
                lines = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("E:")]
                warns = [ln for ln in lines if ln.startswith("W:")]
                first = (errors or warns or lines or [""])[0]
                following = lines[lines.index(first) + 1 :] if first in lines else []
                why = f"{first} {following[0]}" if first.endswith(":") and following else first
                skipped.append((f, why.strip() or f"dcmsend exit {result.returncode}"))
                continue
            [path] = arrived
            target = kept / f"{i:03d}_{f.name}"
            path.rename(target)
            syntax, dataset = split_file(target)
            sop_uid = str(pydicom.filereader.read_file_meta_info(target).MediaStorageSOPInstanceUID)
            received.append(Received(f, target, syntax, dataset, sop_uid))
    finally:
        scp.stop()
    return received, skipped


__all__ = [
    "CorpusFile",
    "Received",
    "batches",
    "corpus",
    "dcmsend",
    "reference_receive",
    "split_file",
]
