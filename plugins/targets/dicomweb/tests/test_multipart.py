"""The STOW-RS request body: exact bytes and length, streamed from the files, replayable."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from dicomweb_helpers import job_for, target
from mercure.testing import make_series
from mercure_target_dicomweb.multipart import (
    BodyChanged,
    MultipartError,
    Part,
    StowBody,
    boundary_of,
    first_part_to,
)
from mercure_target_dicomweb.verify import dataset_digest


def parts_of(files: list[Path]) -> list[Part]:
    return [Part(f, f.stat().st_size) for f in files]


def test_body_is_multipart_related_of_the_stored_files(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 3)
    body = StowBody(parts_of(files), boundary="B0UNDARY")
    expected = b"".join(
        b"--B0UNDARY\r\nContent-Type: application/dicom\r\n"
        + f"Content-Length: {f.stat().st_size}\r\n\r\n".encode()
        + f.read_bytes()
        + b"\r\n"
        for f in files
    )
    expected += b"--B0UNDARY--\r\n"
    sent = b"".join(body)
    assert sent == expected
    assert len(body) == len(expected)
    assert body.headers == {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=B0UNDARY',
        "Content-Length": str(len(expected)),
    }
    assert b"".join(body) == expected  # a second pass (httpx may resend) gives the same


def test_a_file_that_changed_after_planning_is_not_sent(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 2)
    body = StowBody(parts_of(files))
    with open(files[1], "ab") as fh:
        fh.write(b"more")
    with pytest.raises(BodyChanged, match="changed while it was being sent"):
        b"".join(body)
    files[1].unlink()
    with pytest.raises(BodyChanged, match="cannot read"):
        b"".join(body)


def test_a_multipart_answer_is_read_back_in_any_chunking(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", 2)
    raw = b"".join(StowBody(parts_of(files), boundary="xyz"))
    for size in (1, 7, 64, 100_000):
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
        sink = io.BytesIO()
        first_part_to(chunks, "xyz", sink)
        assert sink.getvalue() == files[0].read_bytes()
    with pytest.raises(MultipartError):
        first_part_to([raw[:200]], "xyz", io.BytesIO())
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == "a b"
    assert boundary_of("multipart/related; boundary=abc; type=x") == "abc"
    assert boundary_of("application/dicom") is None


def test_dataset_digest_ignores_the_file_meta(tmp_path: Path) -> None:
    (path,) = make_series(tmp_path / "s", 1)
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        digest, size = dataset_digest(fh)
    # Same dataset behind another preamble and meta group length: same digest.
    changed = bytearray(raw)
    changed[:128] = b"\x01" * 128
    assert dataset_digest(io.BytesIO(bytes(changed))) == (digest, size)
    assert size < len(raw) - 132
    assert dataset_digest(io.BytesIO(raw[:-1]))[0] != digest


def test_sending_a_large_job_keeps_memory_flat(tmp_path: Path, stow_server: Any) -> None:
    """80 MB of instances go out with a few MB of Python memory: nothing is read whole."""
    stow_server.keep_bytes = False  # the server hashes what it receives, keeps nothing
    files = make_series(tmp_path / "s", 40, rows=1024, columns=1024)  # 2 MB each
    total = sum(f.stat().st_size for f in files)
    web = target(stow_server.url, batch_max_instances=20, batch_max_bytes=200 * 1024 * 1024)
    tracemalloc.start()
    try:
        result = web.send(job_for(files))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        web.close()
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert len(stow_server.requests) == 2  # 40 MB per request
    assert total > 80 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, f"peak Python memory {peak / 1e6:.1f} MB for {total / 1e6} MB"
