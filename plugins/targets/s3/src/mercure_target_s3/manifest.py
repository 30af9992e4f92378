"""The manifest object: written last, it tells readers that a job's series is complete.

A reader that waits for the manifest and then reads the keys it lists never sees a partial
series: the manifest is uploaded only after every instance object of the job is confirmed by
the service, and it lists each key with its size and SHA-256 so the reader can check what it
downloads. Its format is versioned (``format``, ``version``) and documented in the README.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FORMAT = "mercure-s3-manifest"
VERSION = 1
CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Entry:
    """One instance object of the job."""

    key: str
    size: int
    sha256: str
    sop_instance_uid: str
    file: str


def render(
    *,
    target: str,
    task_id: str,
    bucket: str,
    tags: Mapping[str, str],
    entries: Iterable[Entry],
    now: float | None = None,
) -> bytes:
    """The manifest's JSON bytes; objects sorted by key, so a rewrite lists the same thing."""
    objects = sorted(entries, key=lambda e: e.key)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "target": target,
        "task_id": task_id,
        "bucket": bucket,
        "study_instance_uid": tags.get("StudyInstanceUID", ""),
        "series_instance_uid": tags.get("SeriesInstanceUID", ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "count": len(objects),
        "total_size": sum(e.size for e in objects),
        "objects": [
            {
                "key": e.key,
                "size": e.size,
                "sha256": e.sha256,
                "sop_instance_uid": e.sop_instance_uid,
                "file": e.file,
            }
            for e in objects
        ],
    }
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")
