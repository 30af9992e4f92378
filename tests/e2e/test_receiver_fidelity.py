"""What the router receives of real-world files is what DCMTK's storescp receives.

A corpus of files from many tools and vendors (:mod:`mercure.testing_corpus`) is sent with
``dcmsend`` (the sender mercure's own dicom target uses) once to ``storescp +xa +B
--promiscuous`` (mercure's receiver with ``accept_compressed_images``, bit preserving) and once
to the router, which routes everything to a folder target. Every file storescp takes must reach
the target with the same transfer syntax and the same encoded dataset, byte for byte (the
router writes its own file meta, as storescp does, and changes nothing after it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from e2e_support import ProcessFactory, spool_config, wait_until, write_config
from mercure.testing import make_dataset
from mercure.testing_corpus import (
    PRIVATE_SOP_CLASS,
    Received,
    batches,
    corpus,
    dcmsend,
    instance_uids,
    reference_receive,
    split_file,
)
from mercure.testing_dicom import DCMTK_BIN, DcmtkStoreSCP
from mercure.testing_peers import free_port
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def without_series(path: Path) -> bool:
    """The router refuses an instance without SeriesInstanceUID: it cannot file it."""
    return not dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID")


def has_private_elements(path: Path) -> bool:
    ds = dcmread(path, stop_before_pixels=True)
    return any(element.tag.is_private for element in ds.iterall())


def delivered(target: Path, seen: set[Path]) -> dict[Path, frozenset[str]]:
    """New instance files at the target, with the SOP Instance UIDs that name them."""
    found: dict[Path, frozenset[str]] = {}
    for path in target.rglob("*"):
        if not path.is_file() or path in seen or path.name.startswith("."):
            continue
        try:
            found[path] = instance_uids(path)
        except Exception:
            continue
    return found


def match(batch: list[Received], found: dict[Path, frozenset[str]]) -> dict[Path, Path]:
    """{corpus file: delivered file} for the instances of ``batch`` found."""
    matched: dict[Path, Path] = {}
    for r in batch:
        for path, uids in found.items():
            if r.uids & uids:
                matched[r.source.path] = path
                break
    return matched


@pytest.mark.parametrize("delivery", ["folder", "storescp"])
def test_router_receives_the_corpus_as_storescp_does(
    tmp_path: Path, mercure_processes: ProcessFactory, delivery: str
) -> None:
    """``delivery``: the router's target, a folder, or ``storescp +xa +B`` (the dicom target)."""
    with contextlib.ExitStack() as stops:
        _corpus_through_router(tmp_path, mercure_processes, delivery, stops)


def _corpus_through_router(
    tmp_path: Path, mercure_processes: ProcessFactory, delivery: str, stops: contextlib.ExitStack
) -> None:
    if not (DCMTK_BIN / "dcmsend").exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    files = corpus(tmp_path / "corpus")
    reference, skipped = reference_receive(files, tmp_path / "storescp")
    print(f"corpus: {len(files)} files, storescp +xa received {len(reference)}; skipped:")
    for f, why in skipped:
        print(f"  {f.name} ({f.transfer_syntax or 'no meta'}): {why}")
    syntaxes = {r.transfer_syntax for r in reference}
    # The corpus covers what the issue asks for (these hold for pydicom's own test files).
    for wanted in (
        "1.2.840.10008.1.2.1",  # explicit little endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.5",  # RLE
    ):
        assert wanted in syntaxes, f"no file of {wanted} in the corpus"
    names = {r.source.name for r in reference}
    assert {"chrH31.dcm", "chrX1.dcm", "waveform_ecg.dcm", "rtdose.dcm", "test-SR.dcm"} <= names
    assert {"made_encapsulated_pdf.dcm", "made_private_sop_class.dcm"} <= names
    with_private = [r.source.name for r in reference if has_private_elements(r.path)]
    assert len(with_private) >= 5, with_private

    target = tmp_path / "target"
    target.mkdir()
    settings: dict[str, Any] = {"target_type": "folder", "folder": str(target)}
    if delivery == "storescp":
        scp = DcmtkStoreSCP(target / "in", free_port(), extra_args=("+xa", "--promiscuous"))
        scp.start()
        stops.callback(scp.stop)
        settings = {"target_type": "dicom", "ip": "127.0.0.1", "port": str(scp.port)}
        settings["aet_target"] = scp.aet
    config = spool_config(
        tmp_path / "router",
        accept_compressed_images=True,
        targets={"out": settings},
        rules={"all": {"rule": "True", "target": "out"}},
    )
    path = write_config(tmp_path / "mercure.json", config)
    router = mercure_processes.start("router", "run", "--config", str(path))

    refused = {r.source.path for r in reference if without_series(r.path)}
    print("refused by the router (no SeriesInstanceUID):", sorted(p.name for p in refused))
    by_source: dict[Path, Received] = {
        r.source.path: r for r in reference if r.source.path not in refused
    }
    seen: set[Path] = set()
    arrived: dict[Path, Path] = {}
    kept = tmp_path / "kept"
    kept.mkdir()
    for batch in batches(reference):
        result = dcmsend([r.source.path for r in batch], int(config["port"]))
        wanted = [r for r in batch if r.source.path not in refused]

        def complete(wanted: list[Received] = wanted) -> dict[Path, Path] | None:
            matched = match(wanted, delivered(target, seen))
            return matched if len(matched) == len(wanted) else None

        try:
            found = wait_until(complete, 90, f"{len(wanted)} instances at the target")
        except AssertionError:
            matched = match(wanted, delivered(target, seen))
            missing = sorted(r.source.name for r in wanted if r.source.path not in matched)
            print(result.stdout, result.stderr, router.output())
            raise AssertionError(f"not delivered by the router: {missing}") from None
        for source, path in found.items():
            if delivery == "storescp":  # moved: a later file of the same UID takes its name
                path = path.rename(kept / f"{len(arrived)}_{path.name}")
            arrived[source] = path
            seen.add(path)

    mismatches = []
    for source, ref in by_source.items():
        syntax, dataset = split_file(arrived[source])
        if syntax != ref.transfer_syntax:
            mismatches.append(f"{source.name}: syntax {syntax}, storescp {ref.transfer_syntax}")
        elif dataset != ref.dataset:
            mismatches.append(f"{source.name}: dataset differs ({len(dataset)}/{len(ref.dataset)})")
    assert mismatches == []
    late = delivered(target, seen)
    assert not late, f"delivered though refused: {sorted(late)}"
    print(f"{len(by_source)} files identical, {len(syntaxes)} transfer syntaxes")


def test_unknown_sop_class_then_ct_on_one_association_both_delivered(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    config = spool_config(
        tmp_path / "router",
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
    )
    path = write_config(tmp_path / "mercure.json", config)
    mercure_processes.start("router", "run", "--config", str(path))
    private = make_dataset(generate_uid(), generate_uid(), 0, sop_class=PRIVATE_SOP_CLASS)
    ct = make_dataset(generate_uid(), generate_uid(), 0)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", int(config["port"]), ae_title="MERCURE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (private, ct)]
        assert assoc.is_established, "the association did not survive the unknown SOP class"
    finally:
        assoc.release()
    assert statuses == [0, 0]

    def both() -> dict[str, Path] | None:
        found = {uid: path for path, uids in delivered(target, set()).items() for uid in uids}
        return found if {private.SOPInstanceUID, ct.SOPInstanceUID} <= set(found) else None

    found = wait_until(both, 60, "both instances at the folder target")
    meta = read_file_meta_info(found[private.SOPInstanceUID])
    assert meta.MediaStorageSOPClassUID == PRIVATE_SOP_CLASS
