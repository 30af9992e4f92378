"""The whole path: DICOM into the router, the router's dispatcher, this target, a real store.

* 200 instances arrive under the right keys with the right bytes, and a reader that watches
  the bucket during the transfer never sees the manifest before the whole series;
* the store is killed mid-job (SIGKILL) and started again: the job completes, no object is
  missing, none that was complete is uploaded again, and the manifest comes last.
"""

from __future__ import annotations

import contextlib
import json
import threading
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.jobs.task import read_task
from mercure.testing import config_for, make_series, start_router, store_instances, wait_for
from pydicom import dcmread

if TYPE_CHECKING:
    from conftest import FaultProxy, SeaweedS3

pytestmark = [pytest.mark.peer, pytest.mark.slow]

COUNT = 200
#: Seconds without a new instance before the router calls a series complete: long enough that
#: a busy test machine does not split the 200 instances into two series (two jobs).
SERIES_QUIET = 10


def _one_job(folder: Path) -> Path | None:
    jobs = [p for p in folder.iterdir() if p.is_dir()] if folder.exists() else []
    return jobs[0] if len(jobs) == 1 else None


class Reader(threading.Thread):
    """Watches the bucket like a downstream reader that waits for the manifest."""

    def __init__(self, s3: SeaweedS3, bucket: str) -> None:
        super().__init__(daemon=True)
        self.s3 = s3
        self.bucket = bucket
        self.stop = threading.Event()
        self.looks = 0
        self.saw_manifest = False
        self.violations: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # the store may be down: look again
                self.look()
            self.stop.wait(0.05)

    def look(self) -> None:
        keys = self.s3.keys(self.bucket)
        self.looks += 1
        for key in [k for k in keys if k.endswith("/manifest.json")]:
            doc = json.loads(self.s3.body(self.bucket, key))
            self.saw_manifest = True
            listed = {o["key"]: o["size"] for o in doc["objects"]}
            missing = [k for k in listed if keys.get(k) != listed[k]]
            if missing or len(listed) != COUNT:
                self.violations.append(f"manifest with {len(listed)} objects, missing {missing}")


def _check_delivered(s3: SeaweedS3, bucket: str, job: Path, originals: list[Path]) -> None:
    keys = s3.keys(bucket)
    names = sorted(p.name for p in job.glob("*.dcm"))
    assert len(names) == COUNT
    manifest_key = f"mercure/{job.name}/manifest.json"
    assert set(keys) == {f"mercure/{job.name}/{n}" for n in names} | {manifest_key}
    by_uid = {dcmread(p).SOPInstanceUID: p for p in originals}
    for name in names:
        body = s3.body(bucket, f"mercure/{job.name}/{name}")
        assert body == (job / name).read_bytes()
        got = dcmread(BytesIO(body))
        sent = dcmread(by_uid[got.SOPInstanceUID])
        assert got.PixelData == sent.PixelData and got.SeriesInstanceUID == sent.SeriesInstanceUID
    doc = json.loads(s3.body(bucket, manifest_key))
    assert doc["count"] == COUNT and doc["task_id"] == job.name


def test_a_series_through_the_router_arrives_complete(
    s3_server: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    originals = make_series(tmp_path / "series", COUNT)
    config = config_for(
        tmp_path,
        targets={"store": s3_server.settings(bucket, manifest=True)},
        rules={"all": {"rule": "True", "target": "store"}},
        series_complete_trigger=SERIES_QUIET,
    )
    reader = Reader(s3_server, bucket)
    reader.start()
    try:
        with contextlib.contextmanager(start_router)(config) as router:
            store_instances(originals, router.port)
            success = config.folder("success")
            job = wait_for(lambda: _one_job(success), timeout=180, what="the job in success/")
    finally:
        reader.stop.set()
        reader.join(timeout=30)
    _check_delivered(s3_server, bucket, job, originals)
    assert reader.looks > 0 and not reader.violations
    task = read_task(job)
    assert task.dispatch_state is not None
    assert len(task.dispatch_state.delivered["store"]) == COUNT


def test_store_killed_mid_job_then_restarted(
    s3_server: SeaweedS3, bucket: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    originals = make_series(tmp_path / "series", COUNT)
    settings = s3_server.settings(
        bucket, endpoint=fault_proxy.endpoint, manifest=True, read_timeout=10
    )
    config = config_for(
        tmp_path,
        targets={"store": settings},
        rules={"all": {"rule": "True", "target": "store"}},
        retry_delay=1,
        retry_delay_max=2,
        retry_max=200,
        series_complete_trigger=SERIES_QUIET,
    )
    # Two uploads are stored but their answers lost; after 60 more the rest wait in the
    # proxy while the store is killed.
    fault_proxy.add("PUT", r"\.dcm$", "lose", times=2, skip=10)
    fault_proxy.add("PUT", r"\.dcm$", "hold", times=10**6, skip=60)
    outgoing = config.folder("outgoing")
    success = config.folder("success")
    with contextlib.contextmanager(start_router)(config) as router:
        store_instances(originals, router.port)
        wait_for(lambda: fault_proxy.held > 0, timeout=120, what="uploads held mid-job")
        s3_server.kill()
        fault_proxy.gate_open.clear()  # nothing reaches the store while it restarts
        fault_proxy.release()  # the held requests now meet a dead store
        job = wait_for(lambda: _one_job(outgoing), timeout=60, what="the job in outgoing/")

        def failed_once() -> bool:
            with contextlib.suppress(FileNotFoundError, ValueError):
                dispatch = read_task(job).dispatch_state
                return dispatch is not None and (dispatch.retries or 0) >= 1
            return False

        wait_for(failed_once, timeout=120, what="a failed delivery attempt")
        s3_server.start()
        before = set(s3_server.keys(bucket))  # what the store holds, complete, after the crash
        mark = len(fault_proxy.seen)
        fault_proxy.gate_open.set()
        done = wait_for(lambda: _one_job(success), timeout=240, what="the job in success/")

    _check_delivered(s3_server, bucket, done, originals)
    manifest_key = f"mercure/{done.name}/manifest.json"
    instance_keys = {k for k in s3_server.keys(bucket) if k != manifest_key}
    assert manifest_key not in before  # no manifest while the series was incomplete
    assert 60 <= len(before) < COUNT  # the crash really came mid-job
    after = fault_proxy.seen[mark:]
    resent = {s.key.split("/", 2)[2] for s in after if s.method == "PUT"} & before
    assert not resent, f"complete objects uploaded again: {sorted(resent)[:5]}"
    stored_puts: dict[str, int] = {}
    for seen in fault_proxy.requests("PUT"):
        if seen.status in (200, "lost-200"):
            key = seen.key.split("/", 2)[2]
            stored_puts[key] = stored_puts.get(key, 0) + 1
    assert {k for k, n in stored_puts.items() if n > 1} == set()  # no object stored twice
    assert set(stored_puts) >= instance_keys - before
    assert len(fault_proxy.requests("PUT", "lost-200")) == 2
    ok_puts = fault_proxy.requests("PUT", 200)
    assert ok_puts[-1].key == f"/{bucket}/{manifest_key}"
    task: Any = read_task(done)
    assert task.dispatch_state.retries >= 1
