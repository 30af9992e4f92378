"""The negotiation policy applied by the pynetdicom acceptor, on real associations.

These check the two pynetdicom behaviours :mod:`mercure.builtin.dicom_acceptance` relies on
(per-association supported contexts set at ``EVT_REQUESTED``; the service of an unknown SOP
class taken from ``EVT_SOP_COMMON``) against the installed, pinned pynetdicom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mercure.builtin.dicom_acceptance import supported_contexts
from mercure.builtin.dicom_negotiation import NegotiationSettings, ProposedContext, negotiate
from mercure.builtin.dicom_receiver import DicomReceiver, dicom_receiver_for
from mercure.jobs.incoming import IncomingSpool
from mercure.testing import make_dataset
from mercure.testing_router import config_for
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.association import Association

PRIVATE_CLASS = "1.2.3.4.5.6.7.8.9.10"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"
VERIFICATION = "1.2.840.10008.1.1"


@contextlib.contextmanager
def receiver(tmp_path: Path, **overrides: Any) -> Iterator[DicomReceiver]:
    config = config_for(tmp_path, dicom_receiver={"bind_address": "127.0.0.1"}, **overrides)
    rx = dicom_receiver_for(config, IncomingSpool(config.folder("incoming"), fsync=False))
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()


@contextlib.contextmanager
def association(port: int, contexts: list[tuple[str, list[str]]]) -> Iterator[Association]:
    ae = AE(ae_title="NEGOTIATE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.requested_contexts = [build_context(a, ts) for a, ts in contexts]
    assoc = ae.associate("127.0.0.1", port, ae_title="MERCURE")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def answers(assoc: Association) -> dict[int, str | int]:
    """{context id: accepted transfer syntax, or the rejection result}"""
    result: dict[int, str | int] = {}
    for cx in assoc.accepted_contexts:
        result[int(cx.context_id or 0)] = str(cx.transfer_syntax[0])
    for cx in assoc.rejected_contexts:
        result[int(cx.context_id or 0)] = int(cx.result or 0)
    return result


def stored(rx: DicomReceiver) -> set[str]:
    return {p.stem for p in rx.spool.folder.rglob("*.dcm")}


def instance(sop_class: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = make_dataset(
        generate_uid(), generate_uid(), 0, sop_class=sop_class, transfer_syntax=transfer_syntax
    )
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def test_senders_syntax_is_accepted_in_its_order(tmp_path: Path) -> None:
    contexts = [
        (CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),  # 1
        (CTImageStorage, [JPEGLSLossless, ExplicitVRLittleEndian]),  # 3
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),  # 5
        (CTImageStorage, [RLELossless]),  # 7
        (CTImageStorage, [ExplicitVRBigEndian, ImplicitVRLittleEndian]),  # 9
        (PRIVATE_CLASS, [ImplicitVRLittleEndian]),  # 11
        (FIND, [ExplicitVRLittleEndian]),  # 13
        (VERIFICATION, [ImplicitVRLittleEndian]),  # 15
        (CTImageStorage, ["1.2.840.113619.5.2"]),  # 17: a private syntax
    ]
    with (
        receiver(tmp_path, accept_compressed_images=True) as rx,
        association(rx.port, contexts) as assoc,
    ):
        assert answers(assoc) == {
            1: ExplicitVRLittleEndian,
            3: JPEGLSLossless,
            5: ExplicitVRLittleEndian,
            7: RLELossless,
            9: ExplicitVRBigEndian,
            11: ImplicitVRLittleEndian,
            13: 3,  # abstract syntax not supported
            15: ImplicitVRLittleEndian,
            17: 4,  # transfer syntaxes not supported
        }


def test_without_compressed_images_uncompressed_only(tmp_path: Path) -> None:
    contexts = [
        (CTImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian]),
        (CTImageStorage, [RLELossless]),
        (CTImageStorage, [DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    with receiver(tmp_path) as rx, association(rx.port, contexts) as assoc:
        assert answers(assoc) == {1: ExplicitVRLittleEndian, 3: 4, 5: ImplicitVRLittleEndian}


def test_unknown_class_then_ct_on_one_association_both_stored(tmp_path: Path) -> None:
    private = instance(PRIVATE_CLASS)
    retired = instance("1.2.840.10008.5.1.4.1.1.5")  # NM Image Storage (Retired)
    ct = instance(CTImageStorage)
    contexts = [
        (PRIVATE_CLASS, [ExplicitVRLittleEndian]),
        ("1.2.840.10008.5.1.4.1.1.5", [ExplicitVRLittleEndian]),
        (CTImageStorage, [ExplicitVRLittleEndian]),
    ]
    with receiver(tmp_path) as rx, association(rx.port, contexts) as assoc:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (private, retired, ct)]
        assert assoc.is_established
        assert statuses == [0, 0, 0]
        assert stored(rx) == {private.SOPInstanceUID, retired.SOPInstanceUID, ct.SOPInstanceUID}


def test_an_instance_it_cannot_take_fails_alone(tmp_path: Path) -> None:
    bad = instance(PRIVATE_CLASS)
    del bad.SeriesInstanceUID
    good = instance(PRIVATE_CLASS)
    with (
        receiver(tmp_path) as rx,
        association(rx.port, [(PRIVATE_CLASS, [ExplicitVRLittleEndian])]) as assoc,
    ):
        first = int(assoc.send_c_store(bad).Status)
        second = int(assoc.send_c_store(good).Status)
        assert (first & 0xF000) in (0xA000, 0xC000) and second == 0
        assert assoc.is_established
        assert stored(rx) == {good.SOPInstanceUID}


def test_contradicting_orders_still_get_a_proposed_syntax() -> None:
    proposed = [
        ProposedContext(1, CTImageStorage, (JPEGBaseline8Bit, ExplicitVRLittleEndian)),
        ProposedContext(3, CTImageStorage, (ExplicitVRLittleEndian, JPEGBaseline8Bit)),
        ProposedContext(5, CTImageStorage, (ImplicitVRLittleEndian,)),
    ]
    outcomes = negotiate(proposed, NegotiationSettings(accept_compressed_images=True))
    [context] = supported_contexts(outcomes, proposed)
    order = list(context.transfer_syntax)
    assert set(order) == {JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@pytest.mark.parametrize(
    "listed",
    [
        [(ImplicitVRLittleEndian, ExplicitVRLittleEndian), (ImplicitVRLittleEndian,)],
        [(JPEGLSLossless, ExplicitVRLittleEndian), (ExplicitVRLittleEndian,), (RLELossless,)],
        [(ExplicitVRBigEndian, ExplicitVRLittleEndian), (ExplicitVRLittleEndian,)],
    ],
)
def test_supported_order_gives_each_context_its_choice(listed: list[tuple[str, ...]]) -> None:
    proposed = [ProposedContext(2 * i + 1, CTImageStorage, ts) for i, ts in enumerate(listed)]
    outcomes = negotiate(proposed, NegotiationSettings(accept_compressed_images=True))
    [context] = supported_contexts(outcomes, proposed)
    for cx, outcome in zip(proposed, outcomes, strict=True):
        first = next(ts for ts in context.transfer_syntax if ts in cx.transfer_syntaxes)
        assert first == outcome.transfer_syntax


def _answers_of(port: int, contexts: list[tuple[str, list[str]]]) -> dict[int, str | int]:
    with association(port, contexts) as assoc:
        return answers(assoc)


@pytest.mark.peer
@pytest.mark.parametrize("compressed", [False, True])
def test_accepts_what_storescp_accepts(tmp_path: Path, compressed: bool) -> None:
    """Each known syntax alone, then the lists DCMTK's senders propose: same choices as
    ``storescp`` (``+xa`` when compressed images are accepted); the router takes more."""
    from mercure.testing_dicom import DcmtkStoreSCP
    from mercure.testing_peers import free_port
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    singles = [(CTImageStorage, [ts]) for ts in ALL_TRANSFER_SYNTAXES]
    lists = [
        [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian],  # dcmsend
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
        [ExplicitVRBigEndian, ImplicitVRLittleEndian],
        [RLELossless],
        [JPEGBaseline8Bit],
    ]
    contexts = singles + [(CTImageStorage, ts) for ts in lists]
    contexts += [(PRIVATE_CLASS, [ExplicitVRLittleEndian]), (FIND, [ExplicitVRLittleEndian])]
    scp = DcmtkStoreSCP(
        tmp_path / "scp",
        free_port(),
        aet="MERCURE",
        extra_args=("--promiscuous", *(("+xa",) if compressed else ())),
    ).start()
    try:
        reference = _answers_of(scp.port, contexts)
    finally:
        scp.stop()
    with receiver(tmp_path / "router", accept_compressed_images=compressed) as rx:
        ours = _answers_of(rx.port, contexts)
    differing = {
        cid: (reference[cid], ours[cid])
        for cid in reference
        if reference[cid] != ours[cid] and not (isinstance(reference[cid], int) and compressed)
    }
    assert differing == {}, "answers (storescp, router) that differ"
    accepted_by_scp = {cid for cid, a in reference.items() if isinstance(a, str)}
    accepted_by_us = {cid for cid, a in ours.items() if isinstance(a, str)}
    assert accepted_by_scp <= accepted_by_us
    if compressed:
        assert len(accepted_by_us) > len(accepted_by_scp)  # e.g. HTJ2K, JPEG XL
