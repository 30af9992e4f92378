"""How instances are sent: one association, contexts from the files, stored bytes, fallbacks.

The peer is an in-process pynetdicom SCP (``RecordingSCP`` in conftest) that records what
each association proposed and delivered.
"""

from __future__ import annotations

import socket
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import dataset_bytes, make_dataset, make_series
from mercure_target_dicom import DicomTarget, DicomTargetConfig
from mercure_target_dicom.sender import (
    MAX_CONTEXTS,
    Instance,
    Peer,
    _associate,
    _make_ae,
    _Watch,
    group_for_associations,
    plan_contexts,
)
from mercure_target_dicom.status import describe_status, is_delivered
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def job_for(files: list[Path], tags: dict[str, str] | None = None) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="pacs"),
    )
    return DeliveryJob("job-1", files[0].parent, files, tags or {}, task)


def target_for(port: int, **extra: object) -> DicomTarget:
    fields: dict[str, object] = {
        "ip": "127.0.0.1",
        "port": str(port),
        "aet_target": "RECORDER",
        "timeout": 10,
    }
    fields.update(extra)
    return DicomTarget("pacs", DicomTargetConfig(**fields))


def jpeg_file(folder: Path) -> Path:
    """An instance stored as JPEG Baseline (its frame is opaque bytes: it is never decoded)."""
    ds = make_dataset(generate_uid(), generate_uid(), 0, transfer_syntax=JPEGBaseline8Bit)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(60) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- contexts ---------------------------------------------------------------------------------


def test_contexts_come_from_the_files_stored_syntax_first() -> None:
    ct, mr = UID(CTImageStorage), UID(MRImageStorage)
    instances = [
        Instance(Path("a"), ct, UID("1.1"), UID(ExplicitVRLittleEndian)),
        Instance(Path("b"), ct, UID("1.2"), UID(ExplicitVRLittleEndian)),
        Instance(Path("c"), mr, UID("1.3"), UID(JPEGBaseline8Bit)),
        Instance(Path("d"), mr, UID("1.4"), UID(DeflatedExplicitVRLittleEndian)),
    ]
    assert plan_contexts(instances) == [
        (ct, [ExplicitVRLittleEndian]),
        (ct, [ImplicitVRLittleEndian]),  # lossless fallback
        (mr, [JPEGBaseline8Bit]),  # compressed: no fallback, never decompressed
        (mr, [DeflatedExplicitVRLittleEndian]),
        (mr, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


def test_jobs_needing_more_than_128_contexts_are_split() -> None:
    instances = [
        Instance(Path(str(i)), UID(f"1.2.3.{i}"), UID(f"9.{i}"), UID(ExplicitVRLittleEndian))
        for i in range(100)
    ]
    groups = group_for_associations(instances)
    assert len(groups) == 2
    assert all(len(plan_contexts(g)) <= MAX_CONTEXTS for g in groups)
    assert sorted(i.path.name for g in groups for i in g) == sorted(str(i) for i in range(100))


def test_one_association_per_job_with_only_the_needed_contexts(
    tmp_path: Path, recording_scp
) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 12)
    result = target_for(scp.port).send(job_for(files))
    assert len(result.delivered) == 12
    assert len(scp.associations) == 1
    assert {cx[0] for cx in scp.contexts} == {CTImageStorage}


def test_stored_bytes_are_sent_without_re_encoding(tmp_path: Path, recording_scp) -> None:
    # SOP Class UID stored with VR UN: decoding and re-encoding would rewrite it as UI.
    path = make_series(tmp_path / "s", 1)[0]
    raw = path.read_bytes()
    sop_class = CTImageStorage.encode() + b"\x00"
    explicit = b"\x08\x00\x16\x00UI" + len(sop_class).to_bytes(2, "little") + sop_class
    as_un = b"\x08\x00\x16\x00UN\x00\x00" + len(sop_class).to_bytes(4, "little") + sop_class
    assert raw.count(explicit) == 1
    path.write_bytes(raw.replace(explicit, as_un))
    decoded = pydicom.dcmread(path)
    _ = decoded.SOPClassUID, decoded.SOPInstanceUID  # what a decoding sender reads
    assert encode(decoded, False, True) != dataset_bytes(path)  # re-encoding would change it

    scp = recording_scp()
    result = target_for(scp.port).send(job_for([path]))
    assert result.delivered == [path.name]
    assert scp.datasets[str(decoded.SOPInstanceUID)] == dataset_bytes(path)


def test_lossless_fallback_when_the_peer_refuses_the_stored_syntax(
    tmp_path: Path, recording_scp
) -> None:
    scp = recording_scp(syntaxes=[ImplicitVRLittleEndian])
    files = make_series(tmp_path / "s", 3, transfer_syntax=ExplicitVRLittleEndian)
    result = target_for(scp.port).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    for path in files:
        original = pydicom.dcmread(path)
        got = pydicom.filereader.read_dataset(
            BytesIO(scp.datasets[str(original.SOPInstanceUID)]),
            is_implicit_VR=True,
            is_little_endian=True,
        )
        assert got == original  # same content, converted to Implicit VR Little Endian
        assert got.PixelData == original.PixelData


def test_deflated_is_sent_as_stored_or_inflated(tmp_path: Path, recording_scp) -> None:
    files = make_series(tmp_path / "s", 2, transfer_syntax=DeflatedExplicitVRLittleEndian)
    as_stored = recording_scp()
    assert len(target_for(as_stored.port).send(job_for(files)).delivered) == 2
    for path in files:
        assert as_stored.datasets[pydicom.dcmread(path).SOPInstanceUID] == dataset_bytes(path)

    inflating = recording_scp(syntaxes=[ExplicitVRLittleEndian])
    assert len(target_for(inflating.port).send(job_for(files)).delivered) == 2
    for path in files:
        original = pydicom.dcmread(path)
        got = pydicom.filereader.read_dataset(
            BytesIO(inflating.datasets[original.SOPInstanceUID]),
            is_implicit_VR=False,
            is_little_endian=True,
        )
        assert got == original
    assert {ts for _, ts in inflating.contexts} == {ExplicitVRLittleEndian}


def test_compressed_instances_are_never_decompressed(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp(syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    folder = tmp_path / "s"
    plain = make_series(folder, 2)
    jpeg = jpeg_file(folder)
    result = target_for(scp.port).send(job_for([*plain, jpeg]))
    assert sorted(result.delivered) == sorted(f.name for f in plain)
    reason = result.failed[jpeg.name]
    assert "JPEG Baseline" in reason and "not converted" in reason
    assert "configure the peer to accept that transfer syntax" in reason
    assert len(scp.stored()) == 2


def test_compressed_instance_sent_as_stored_when_accepted(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp(syntaxes=[JPEGBaseline8Bit, ExplicitVRLittleEndian])
    path = jpeg_file(tmp_path)
    result = target_for(scp.port).send(job_for([path]))
    assert result.delivered == [path.name]
    assert scp.datasets[pydicom.dcmread(path).SOPInstanceUID] == dataset_bytes(path)


def test_unreadable_file_fails_alone(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 2)
    broken = tmp_path / "s" / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    result = target_for(scp.port).send(job_for([*files, broken]))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert "cannot read broken.dcm as a DICOM file" in result.failed["broken.dcm"]


# -- statuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "delivered"),
    [
        (0x0000, True),
        (0xB000, True),
        (0xB006, True),
        (0xB007, True),
        (0x0001, True),
        (0xA700, False),
        (0xA7FF, False),
        (0xA900, False),
        (0xC000, False),
        (0xC123, False),
        (0x0117, False),
        (0x0122, False),
        (0x0124, False),
        (0x0211, False),
    ],
)
def test_status_categories(code: int, delivered: bool) -> None:
    assert is_delivered(code) is delivered


def test_status_descriptions() -> None:
    assert describe_status(0xA700) == "status 0xA700 (Refused: Out of Resources)"
    assert describe_status(0xA7F3) == "status 0xA7F3 (Refused: Out of Resources)"
    assert "cannot understand" in describe_status(0xC042).lower()


def test_warning_and_failure_statuses_per_instance(tmp_path: Path, recording_scp) -> None:
    files = make_series(tmp_path / "s", 6)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    scp = recording_scp(fail={uids[1]: 0xB000, uids[2]: 0xA700, uids[4]: 0xC000})
    result = target_for(scp.port).send(job_for(files))
    assert sorted(result.delivered) == sorted(files[i].name for i in (0, 1, 3, 5))
    assert set(result.failed) == {files[2].name, files[4].name}
    assert result.failed[files[2].name] == (
        f"status 0xA700 (Refused: Out of Resources) for SOP Instance {uids[2]}"
    )
    assert result.failed[files[4].name].startswith("status 0xC000 (")
    assert result.error is None


# -- association problems -----------------------------------------------------------------------


def test_rejected_association_names_the_ae_titles(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp(require_called_aet=True)
    with pytest.raises(TargetError) as info:
        target_for(scp.port, aet_target="WRONG", aet_source="ROUTER").send(
            job_for(make_series(tmp_path / "s", 1))
        )
    text = str(info.value)
    assert f"C-STORE to WRONG@127.0.0.1:{scp.port}: association rejected" in text
    assert "Called AE title not recognised" in text
    assert "calling AE title 'ROUTER'" in text and "called AE title 'WRONG'" in text
    assert scp.stored() == set()


@pytest.mark.slow
def test_no_response_within_the_timeout(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp(stall=4)
    files = make_series(tmp_path / "s", 3)
    result = target_for(scp.port, timeout=1).send(job_for(files))
    assert result.delivered == []
    reasons = [result.failed[f.name] for f in files]
    assert all("no response within 1 s (DIMSE timeout)" in r for r in reasons), reasons
    assert result.error is not None and "will be retried" in result.error


def test_no_accepted_context_is_explained(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp(syntaxes=[JPEGBaseline8Bit])
    with pytest.raises(TargetError, match="accepted none of the proposed presentation contexts"):
        target_for(scp.port).send(job_for(make_series(tmp_path / "s", 1)))


def test_return_to_sender_with_passed_ae_titles(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp()
    files = make_series(tmp_path / "s", 2)
    target = target_for(scp.port, ip="sender", pass_sender_aet=True, pass_receiver_aet=True)
    tags = {"SenderAddress": "127.0.0.1", "SenderAET": "MODALITY1", "ReceiverAET": "MERCURE_RX"}
    result = target.send(job_for(files, tags))
    assert len(result.delivered) == 2
    assert scp.calling_aets == ["MODALITY1"]
    assert scp.called_aets == ["MERCURE_RX"]
    assert "nothing to test" in target.test_connection()


def test_return_to_sender_without_an_address_fails_clearly(tmp_path: Path) -> None:
    target = target_for(104, ip="sender")
    with pytest.raises(TargetError, match="does not record the address it came from"):
        target.send(job_for(make_series(tmp_path / "s", 1)))


def test_configured_ae_titles_are_used(tmp_path: Path, recording_scp) -> None:
    scp = recording_scp()
    target_for(scp.port, aet_source="ROUTER", aet_target="ARCHIVE").send(
        job_for(make_series(tmp_path / "s", 1), {"SenderAET": "IGNORED"})
    )
    assert scp.calling_aets == ["ROUTER"] and scp.called_aets == ["ARCHIVE"]


def test_tcp_nodelay_is_set_on_the_association_socket(recording_scp) -> None:
    scp = recording_scp()
    peer = Peer("127.0.0.1", scp.port, "RECORDER", "MERCURE", timeout=10)
    ae = _make_ae(peer)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer, _Watch())
    try:
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_reactor_cannot_take_responses(recording_scp) -> None:
    # pynetdicom's reactor polls the DIMSE queue without blocking; on our associations those
    # polls must never take a message a send_c_store is waiting for.
    scp = recording_scp()
    peer = Peer("127.0.0.1", scp.port, "RECORDER", "MERCURE", timeout=10)
    ae = _make_ae(peer)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer, _Watch())
    try:
        marker = (1, object())
        assoc.dimse.msg_queue.put(marker)
        assert assoc.dimse.get_msg(block=False) == (None, None)
        assert assoc.dimse.get_msg(block=True) == marker
    finally:
        assoc.release()


def test_c_echo_over_pynetdicom(recording_scp) -> None:
    scp = recording_scp()
    line = target_for(scp.port).test_connection()
    assert line.startswith(f"C-ECHO to RECORDER@127.0.0.1:{scp.port} succeeded in ")
