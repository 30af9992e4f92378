"""Finding the Series Instance UID by walking element headers, as pydicom would read it."""

from __future__ import annotations

import pytest
from mercure.dicomstream import top_level_value
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

SERIES = 0x0020000E


def _encoded(ds: Dataset, syntax: str) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_the_series_uid_is_found_past_sequences(syntax: str) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True  # walked into, not skipped
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.45"
    ds.InstanceNumber = 3
    raw = _encoded(ds, syntax)
    assert top_level_value(raw, syntax, SERIES) == b"1.2.3.45"


def test_absent_or_garbled_gives_none() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.InstanceNumber = 3
    raw = _encoded(ds, ExplicitVRLittleEndian)
    assert top_level_value(raw, ExplicitVRLittleEndian, SERIES) is None
    assert top_level_value(b"\x08\x00\x18\x00UI\xff\xff", ExplicitVRLittleEndian, SERIES) is None
    assert top_level_value(b"\x20\x00\x0e\x00UI", ExplicitVRLittleEndian, SERIES) is None
