"""Routing tags: the series-level DICOM attributes that rules see, as strings.

Extracted from the received dataset without reading pixel data, decoded with the dataset's
own Specific Character Set. Values are strings, as in mercure: multi-valued attributes are
joined with a backslash, person names in their DICOM form, missing attributes absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# mercure's routing tag set.
ROUTING_TAGS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "Modality",
    "BodyPartExamined",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "IssuerOfPatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "RequestedProcedureDescription",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "ProtocolName",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "SliceThickness",
    "ContrastBolusAgent",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "StationName",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "PerformingPhysicianName",
    "OperatorsName",
    "ImageComments",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImagesInAcquisition",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "Rows",
    "Columns",
)

# Tags the receiver adds about the association (not from the dataset).
SENDER_ADDRESS = "SenderAddress"
SENDER_AET = "SenderAET"
RECEIVER_AET = "ReceiverAET"


def value_to_str(value: Any) -> str:
    """A DICOM value as the string rules compare against."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(value_to_str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return str(value)


def tags_from_dataset(ds: Dataset, extra: Iterable[str] = ()) -> dict[str, str]:
    """The routing tags present in ``ds`` (plus ``extra`` keywords), as strings."""
    tags: dict[str, str] = {}
    for keyword in (*ROUTING_TAGS, *extra):
        if keyword in tags:
            continue
        try:
            element = ds.data_element(keyword)
        except (KeyError, ValueError):
            continue
        if element is None or element.VR == "SQ":
            continue
        try:
            tags[keyword] = value_to_str(element.value)
        except Exception:  # a malformed value must not stop routing on the others
            continue
    return tags


def read_tags(source: bytes | memoryview | str, extra: Iterable[str] = ()) -> dict[str, str]:
    """Parse a DICOM file (path or bytes, with or without preamble) up to the pixel data."""
    fp: Any = BytesIO(source) if isinstance(source, bytes | memoryview) else source
    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    return tags_from_dataset(ds, extra)


def with_receiver_tags(
    tags: Mapping[str, str], sender_address: str, sender_aet: str, receiver_aet: str
) -> dict[str, str]:
    result = dict(tags)
    result[SENDER_ADDRESS] = sender_address
    result[SENDER_AET] = sender_aet
    result[RECEIVER_AET] = receiver_aet
    return result
