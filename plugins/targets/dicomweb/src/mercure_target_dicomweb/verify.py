"""Confirming a conflict: does the server already hold this very instance?

A STOW-RS server answers 409 Conflict (or a FailedSOPSequence item with reason 0x0111,
Duplicate SOP Instance) when it holds an instance with the same SOP Instance UID. That counts
as delivered only when the server shows that its copy is identical: the instance is retrieved
with WADO-RS in the transfer syntax it was stored in (``transfer-syntax=*``), and its encoded
dataset (everything after the file meta information, which servers may rewrite) must equal
the file's byte for byte, compared by SHA-256 and streamed, never held in memory whole.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import httpx

from mercure_target_dicomweb.http import describe_transport_error, server_text
from mercure_target_dicomweb.multipart import CHUNK, MultipartError, boundary_of, first_part_to

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def skip_file_meta(fh: IO[bytes]) -> None:
    """Position ``fh`` at the first byte of the dataset (after preamble and file meta)."""
    start = fh.tell()
    head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        pass
    elif head[:2] == b"\x02\x00":
        fh.seek(start)  # file meta without a preamble
    else:
        fh.seek(start)  # a bare dataset
        return
    while True:
        at = fh.tell()
        tag = fh.read(4)
        if len(tag) < 4:
            fh.seek(at)
            return
        group = struct.unpack("<H", tag[:2])[0]
        if group != 0x0002:
            fh.seek(at)
            return
        vr = fh.read(2)
        if vr in _LONG_VRS:
            fh.read(2)
            (length,) = struct.unpack("<I", fh.read(4))
        else:
            (length,) = struct.unpack("<H", fh.read(2))
        fh.seek(length, 1)


def dataset_digest(fh: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and length of the encoded dataset of a DICOM file (file meta left out)."""
    skip_file_meta(fh)
    digest = hashlib.sha256()
    size = 0
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Verdict:
    """``identical``: delivered. ``different``: a real conflict. ``unknown``: try again later."""

    outcome: Literal["identical", "different", "missing", "unknown"]
    detail: str


def compare_with_server(client: httpx.Client, wado_url: str, path: Path, timeout: float) -> Verdict:
    """Retrieve the instance at ``wado_url`` and compare its dataset with ``path``'s."""
    try:
        with client.stream("GET", wado_url, headers={"Accept": WADO_ACCEPT}) as rsp:
            if rsp.status_code == 404:
                return Verdict("missing", "WADO-RS does not find it (404)")
            if rsp.status_code != 200:
                text = server_text(rsp.read())
                return Verdict("unknown", f"WADO-RS answered HTTP {rsp.status_code} {text}".strip())
            content_type = rsp.headers.get("content-type", "")
            with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as copy:
                if content_type.lower().startswith("multipart/"):
                    boundary = boundary_of(content_type)
                    if not boundary:
                        return Verdict("unknown", "WADO-RS answer has no multipart boundary")
                    first_part_to(rsp.iter_bytes(), boundary, copy)
                else:
                    for chunk in rsp.iter_bytes():
                        copy.write(chunk)
                copy.seek(0)
                theirs = dataset_digest(copy)
    except httpx.TransportError as exc:
        return Verdict("unknown", describe_transport_error(wado_url, exc, timeout))
    except (MultipartError, struct.error) as exc:
        return Verdict("unknown", f"cannot read the WADO-RS answer: {exc}")
    with open(path, "rb") as fh:
        ours = dataset_digest(fh)
    if theirs == ours:
        return Verdict("identical", "the server's copy is identical (WADO-RS, same dataset)")
    return Verdict(
        "different",
        f"the server holds a different instance with this SOP Instance UID ({theirs[1]} "
        f"dataset bytes against {ours[1]} here)",
    )
