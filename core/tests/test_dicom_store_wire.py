"""The acceptor's PDUs and command sets decode as pynetdicom and pydicom read them."""

from __future__ import annotations

from io import BytesIO

import pytest
from mercure.builtin.dicom_negotiation import Outcome, Rejection
from mercure.builtin.dicom_store_wire import (
    C_STORE_RSP,
    IMPLEMENTATION_CLASS_UID,
    MalformedCommand,
    associate_ac,
    file_meta_header,
    parse_command,
    response_command,
)
from pydicom.filereader import dcmread, read_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_associate_ac_decodes_with_the_outcomes_and_the_maximum_pdu() -> None:
    outcomes = [
        Outcome(1, CT, "1.2.840.10008.1.2.1", storage=True),
        Outcome(3, "1.2.3", rejection=Rejection.TRANSFER_SYNTAXES_NOT_SUPPORTED, storage=True),
    ]
    raw = associate_ac(b"MERCURE".ljust(16), b"SCU".ljust(16), outcomes, 32768)
    pdu = A_ASSOCIATE_AC()
    pdu.decode(raw)
    primitive = pdu.to_primitive()
    results = {
        cx.context_id: (cx.result, cx.transfer_syntax)
        for cx in primitive.presentation_context_definition_results_list
    }
    assert results[1][0] == 0 and str(results[1][1][0]) == "1.2.840.10008.1.2.1"
    assert results[3][0] == 4
    assert primitive.maximum_length_received == 32768
    assert str(primitive.implementation_class_uid) == IMPLEMENTATION_CLASS_UID
    assert str(primitive.called_ae_title).strip() == "MERCURE"


def test_response_command_round_trips() -> None:
    raw = response_command(C_STORE_RSP, 7, CT, "1.2.3.4", 0xC000, "dataset cannot be parsed")
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandField == C_STORE_RSP
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.Status == 0xC000
    assert ds.ErrorComment.strip() == "dataset cannot be parsed"
    assert ds.AffectedSOPInstanceUID == "1.2.3.4"
    assert ds.CommandGroupLength == len(raw) - 12


def test_a_request_command_is_parsed_and_garbage_is_refused() -> None:
    rsp = response_command(0x0001, 5, CT, "1.2.3.4", 0, "")
    # a C-STORE-RQ shape: the message ID element (0000,0110) is what requests carry
    rq = rsp.replace(b"\x00\x00\x20\x01", b"\x00\x00\x10\x01")
    command = parse_command(rq[12:])
    assert (command.field, command.message_id, command.sop_class) == (0x0001, 5, CT)
    assert not command.has_dataset
    with pytest.raises(MalformedCommand):
        parse_command(b"\x00\x00\x00\x01\xff\xff\xff\xff")


def test_file_meta_header_is_a_part_10_preamble_and_meta() -> None:
    raw = file_meta_header(CT, "1.2.3.4", "1.2.840.10008.1.2.1", "SCU")
    ds = dcmread(BytesIO(raw + b"\x08\x00\x60\x00CS\x02\x00CT"))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.SourceApplicationEntityTitle == "SCU"
    assert ds.Modality == "CT"
