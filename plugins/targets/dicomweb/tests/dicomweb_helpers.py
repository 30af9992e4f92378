"""Helpers for the DICOMweb target's tests: jobs for ``send``, a scripted ``more``, targets."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob
from mercure_target_dicomweb import DicomWebTarget, DicomWebTargetConfig


def job_for(
    files: list[Path],
    more: Callable[[float], list[Path] | None] | None = None,
    confirm: Callable[[list[str]], None] | None = None,
) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="web"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task, more=more, confirm=confirm)


def scripted_more(
    batches: list[list[Path] | None],
) -> tuple[Callable[[float], list[Path] | None], list[float]]:
    """A ``DeliveryJob.more`` handing out ``batches`` one call at a time (``[]``: waits)."""
    calls: list[float] = []
    queue = iter(batches)

    def more(timeout: float) -> list[Path] | None:
        calls.append(timeout)
        batch = next(queue)
        if batch == []:
            time.sleep(timeout)  # like the dispatcher's: wait, then report that nothing came
        return batch

    return more, calls


def target(url: str, **settings: Any) -> DicomWebTarget:
    """A ``dicomweb`` target for ``url`` with short timeouts."""
    settings.setdefault("timeout", 10)
    return DicomWebTarget("web", DicomWebTargetConfig(url=url, **settings))


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts' bodies of a (small) multipart message held in memory: for checking only."""
    from mercure_target_dicomweb.multipart import boundary_of

    boundary = boundary_of(content_type)
    assert boundary, f"no boundary in {content_type!r}"
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _head, _, rest = chunk.partition(b"\r\n\r\n")
        parts.append(rest[:-2] if rest.endswith(b"\r\n") else rest)
    return parts


def digest_of(data: bytes | Path) -> tuple[str, int]:
    """SHA-256 and length of the encoded dataset (file meta left out) of a file or bytes."""
    import io

    from mercure_target_dicomweb.verify import dataset_digest

    if isinstance(data, Path):
        with open(data, "rb") as fh:
            return dataset_digest(fh)
    return dataset_digest(io.BytesIO(data))


def transfer_syntax_of(data: bytes) -> str:
    import io

    return str(
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    )


def recording_posts(web: DicomWebTarget) -> list[list[str]]:
    """Record the file names of every STOW-RS request ``web`` makes from now on."""
    sent: list[list[str]] = []
    original = web.post_stow

    def post(body: Any) -> Any:
        sent.append([p.path.name for p in body.parts])
        return original(body)

    web.post_stow = post  # type: ignore[method-assign]
    return sent
