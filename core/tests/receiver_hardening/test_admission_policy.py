"""The pieces of admission that need no network: the request check, the lists, the counters."""

from __future__ import annotations

import struct

import pytest
import structlog
from hostile import associate_rq, many_contexts_rq
from mercure.builtin.dicom_admission import REFUSALS, Admission, AdmissionSettings
from mercure.builtin.dicom_pdu import (
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PARAMETER,
    ABORT_UNRECOGNIZED_PDU,
    MAX_PRESENTATION_CONTEXTS,
    MalformedPDU,
    check_associate_rq,
    check_first_header,
)
from mercure.config import DicomReceiverConfig
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian


def test_a_real_request_passes_with_its_ae_titles() -> None:
    contexts = [(CTImageStorage, [ExplicitVRLittleEndian])] * 3
    request = check_associate_rq(
        associate_rq(calling="MODALITY", called="ROUTER", contexts=contexts)
    )
    assert (request.calling_ae, request.called_ae, request.presentation_contexts) == (
        "MODALITY",
        "ROUTER",
        3,
    )


def test_all_context_ids_pass_one_more_is_refused() -> None:
    assert check_associate_rq(many_contexts_rq(MAX_PRESENTATION_CONTEXTS, realistic=True))
    with pytest.raises(MalformedPDU, match="more than 128 presentation contexts"):
        check_associate_rq(many_contexts_rq(MAX_PRESENTATION_CONTEXTS + 1, realistic=True))


@pytest.mark.parametrize(
    ("header", "reason", "message"),
    [
        (b"GET / ", ABORT_UNRECOGNIZED_PDU, "not DICOM"),
        (b"\x04\x00\x00\x00\x00\x10", ABORT_UNEXPECTED_PDU, "not an A-ASSOCIATE-RQ"),
        (b"\x01\x00\xff\xff\xff\xff", 0x06, "more than the 262144 accepted"),
        (b"\x01\x00\x00\x00\x00\x10", 0x06, "shorter than its fixed fields"),
    ],
)
def test_first_header_is_refused_before_anything_else_is_read(
    header: bytes, reason: int, message: str
) -> None:
    with pytest.raises(MalformedPDU, match=message) as info:
        check_first_header(header)
    assert info.value.abort_reason == reason


def test_items_that_lie_about_their_length_or_type_are_refused() -> None:
    good = bytearray(associate_rq())
    first_item = 6 + 68
    lying = bytearray(good)
    lying[first_item + 2 : first_item + 4] = struct.pack(">H", 0xFFFF)
    with pytest.raises(MalformedPDU, match="needs 65535 bytes"):
        check_associate_rq(bytes(lying))
    unknown = bytearray(good)
    unknown[first_item] = 0x33
    with pytest.raises(MalformedPDU, match="unknown item type 0x33") as info:
        check_associate_rq(bytes(unknown))
    assert info.value.abort_reason == ABORT_UNRECOGNIZED_PARAMETER


def test_what_counts_as_a_listed_sender() -> None:
    nobody = AdmissionSettings()
    assert not nobody.sender_listed("10.0.0.1", "MODALITY")
    by_address = AdmissionSettings(allowed_addresses=frozenset({"10.0.0.1"}))
    assert by_address.address_listed("10.0.0.1") and not by_address.address_listed("10.0.0.2")
    assert by_address.sender_listed("10.0.0.1", "ANY")
    by_ae = AdmissionSettings.from_config(DicomReceiverConfig(allowed_calling_aets=["CT1 "]))
    assert not by_ae.address_listed("10.0.0.1")  # the AE title is only known from the request
    assert by_ae.sender_listed("10.0.0.9", "CT1") and not by_ae.sender_listed("10.0.0.9", "CT2")
    both = AdmissionSettings(
        allowed_addresses=frozenset({"10.0.0.1"}), allowed_calling_aets=frozenset({"CT1"})
    )
    assert both.sender_listed("10.0.0.1", "CT1")
    assert not both.sender_listed("10.0.0.1", "CT2") and not both.sender_listed("10.0.0.2", "CT1")


def test_pdu_limit_follows_max_pdu() -> None:
    assert AdmissionSettings(max_pdu=16384).pdu_limit == 16384 + 64
    assert AdmissionSettings(max_pdu=0).pdu_limit == 1 << 30


def test_refusals_are_counted_every_time_and_logged_once_per_interval() -> None:
    admission = Admission(AdmissionSettings())
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            admission.refuse("request_timeout", "192.0.2.7")
        admission.refuse("request_timeout", "192.0.2.8")
    stats = admission.stats.snapshot()
    assert stats["refused_request_timeout"] == 6
    assert stats["refused_total"] == 6
    assert {f"refused_{reason}" for reason in REFUSALS} <= set(stats)
    assert [(e["address"], e["log_level"]) for e in logs] == [
        ("192.0.2.7", "warning"),
        ("192.0.2.8", "warning"),
    ]
    assert logs[0]["event"] == REFUSALS["request_timeout"]
