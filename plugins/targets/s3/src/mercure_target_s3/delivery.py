"""One ``send`` of one job (its instance objects through the target's upload threads), and
the manifest once the dispatcher calls ``finish``.

Rules that keep a reader from ever seeing half a series marked complete, and keep a broken
transfer from losing or duplicating anything:

* a file is reported delivered only once the service answered its PUT (or the final request
  of its multipart upload), or once a HEAD showed the same size and SHA-256 already stored;
* the manifest is written by ``finish``, which the dispatcher calls only once every instance
  of the complete series is confirmed; the job stays in ``outgoing/`` until it succeeds.
  Every instance not uploaded by this process since its start is checked first (HEAD), and a
  missing one is uploaded again;
* a permanent failure (credentials, bucket, permissions) or a failing service stops the
  uploads still queued for the job; they are reported not sent, for the retry.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mercure.targets import DeliveryJob, DeliveryResult

from mercure_target_s3 import manifest
from mercure_target_s3.config import S3TargetConfig
from mercure_target_s3.errors import Failure, Scope, classify
from mercure_target_s3.upload import (
    MAX_KEY_BYTES,
    LocalObject,
    Presence,
    describe,
    existing,
    multipart,
    put,
    put_bytes,
    read_small,
)

T = TypeVar("T")

#: Seconds ``DeliveryJob.more`` waits for the next file of an arriving series per call.
STREAM_POLL = 0.5
#: A streaming send returns after this many seconds without a new file (the dispatcher hands
#: the job back when more arrive).
STREAM_IDLE_RELEASE = 5.0
#: First pause (seconds) before an upload is tried again; doubled each time, up to the cap.
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 5.0


def backoff(attempt: int) -> float:
    """Seconds to wait after try ``attempt`` failed: exponential, capped, with jitter."""
    return min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_CAP) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Done:
    """A file whose object is stored: uploaded now, or found already complete."""

    obj: LocalObject
    sop_instance_uid: str
    present: bool


class NotSent(Exception):
    """The upload was not started because the job's delivery had already stopped."""


class ObjectFailed(Exception):
    """One object failed; ``failure`` says how far that reaches."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Delivery:
    """The state of one ``send`` call; its methods run on the calling thread unless noted."""

    def __init__(
        self,
        *,
        name: str,
        config: S3TargetConfig,
        client: Any,
        pool: Executor,
        job: DeliveryJob,
        log: Any,
    ) -> None:
        self.name = name
        self.config = config
        self.client = client
        self.pool = pool
        self.job = job
        self.log = log
        self.index = job.index()
        self.handed: dict[str, Path] = {}
        self.pending: dict[Future[Done], str] = {}
        self.done: dict[str, Done] = {}
        self.failed: dict[str, str] = {}
        self.stop = threading.Event()
        self.stop_failure: Failure | None = None
        self._lock = threading.Lock()  # keys and the flags below, shared with upload threads
        self._keys: dict[str, str] = {}
        self._head_refused = False
        self.manifest_key: str | None = None
        self.healed: list[str] = []

    # -- the whole call ------------------------------------------------------------------

    def run(self) -> DeliveryResult:
        started = time.monotonic()
        self.submit(self.job.files)
        if self.job.more is not None:
            self.stream()
        self.drain()
        result = self.result()
        if self._head_refused and any(not d.present for d in self.done.values()):
            self.log.warning(
                "S3 HeadObject refused: objects already stored cannot be recognised, so a "
                "retry uploads them again; grant s3:GetObject to these credentials to avoid it",
                target=self.name,
                task_id=self.job.task_id,
                bucket=self.config.bucket,
            )
        self.log.info(
            "S3 upload finished",
            target=self.name,
            task_id=self.job.task_id,
            bucket=self.config.bucket,
            uploaded=sum(1 for d in self.done.values() if not d.present),
            already_present=sum(1 for d in self.done.values() if d.present),
            failed=len(result.failed),
            reuploaded_missing=len(self.healed),
            seconds=round(time.monotonic() - started, 2),
        )
        return result

    def result(self) -> DeliveryResult:
        stop = self.stop_failure
        return DeliveryResult(
            delivered=list(self.done),
            failed=dict(self.failed),
            error=stop.message if stop else None,
            permanent=stop is not None and stop.scope is Scope.PERMANENT,
        )

    # -- handing files to the upload threads ---------------------------------------------

    def submit(self, paths: list[Path]) -> None:
        for path in paths:
            if path.name in self.handed:
                continue
            self.handed[path.name] = path
            if self.index.by_name(path.name) is None:
                self.index.add([path])
            if self.index.by_name(path.name) is None:
                reason = self.index.unreadable.get(path.name, "not a readable DICOM file")
                self.failed[path.name] = f"not uploaded: {reason}"
                continue
            self.pending[self.pool.submit(self.upload, path, False)] = path.name

    def stream(self) -> bool:
        """Take the files of a still arriving series; True once it is complete."""
        more = self.job.more
        assert more is not None
        idle_since = time.monotonic()
        while not self.stop.is_set():
            self.collect(0)
            asked = time.monotonic()
            new = more(STREAM_POLL)
            if new is None:
                return True
            if new:
                self.submit(new)
                idle_since = time.monotonic()
                continue
            if time.monotonic() - asked < STREAM_POLL / 2:
                return False  # ``more`` answers "nothing" at once only when the dispatcher stops
            idle = time.monotonic() - idle_since
            if not self.pending and idle >= STREAM_IDLE_RELEASE:
                return False
        return False

    def drain(self) -> None:
        while self.pending:
            self.collect(1.0)

    def collect(self, timeout: float) -> None:
        """Record finished uploads and confirm them to the dispatcher."""
        if not self.pending:
            return
        finished, _ = wait(list(self.pending), timeout=timeout, return_when=FIRST_COMPLETED)
        newly: list[str] = []
        for future in finished:
            name = self.pending.pop(future)
            try:
                self.done[name] = future.result()
            except NotSent:
                reason = self.stop_failure.message if self.stop_failure else "delivery stopped"
                self.failed[name] = f"not sent: {reason}"
                continue
            except ObjectFailed as exc:
                self.failed[name] = exc.failure.message
                if exc.failure.scope is not Scope.OBJECT:
                    self.halt(exc.failure)
                continue
            newly.append(name)
        if newly and self.job.confirm is not None:
            self.job.confirm(newly)

    def halt(self, failure: Failure) -> None:
        """Stop the job's queued uploads; a permanent reason wins over a passing one."""
        with self._lock:
            current = self.stop_failure
            if current is None or (
                failure.scope is Scope.PERMANENT and current.scope is not Scope.PERMANENT
            ):
                self.stop_failure = failure
        self.stop.set()

    # -- one object (runs on an upload thread) -------------------------------------------

    def upload(self, path: Path, earlier: bool) -> Done:
        """Store ``path`` unless an identical object is there; ``earlier``: delivered before.

        A file delivered by an earlier call is only checked: uploaded again if its object is
        missing or different, trusted when the check itself is refused. A request that fails
        for a passing reason (throttling, 5xx, a broken connection) is tried again here, up
        to ``max_attempts`` times, after a HEAD: an upload whose answer was lost is then
        found complete and not sent twice.
        """
        if self.stop.is_set():
            raise NotSent()
        key = ""
        try:
            info = self.index.by_name(path.name)
            if info is None:
                raise ObjectFailed(Failure(Scope.OBJECT, f"{path.name}: not indexed"))
            pattern = self.config.key_pattern
            relative = self.job.render(pattern, self.index, path.name, target=self.name)
            key = self.config.object_key(relative)
            self.claim_key(key, path.name)
            metadata = {"sop-instance-uid": info.sop_instance_uid, "task-id": self.job.task_id}
            data: bytes | None = None
            if path.stat().st_size >= self.config.multipart_threshold:
                obj = describe(path, key, metadata)
            else:
                obj, data = read_small(path, key, metadata)
        except (NotSent, ObjectFailed):
            raise
        except Exception as exc:
            target = f"s3://{self.config.bucket}/{key}" if key else f"bucket {self.config.bucket}"
            raise ObjectFailed(classify(exc, f"upload of {path.name} to {target}")) from exc
        what = f"upload of {path.name} to s3://{self.config.bucket}/{key}"
        return self.attempts(what, lambda: self.store(obj, data, info.sop_instance_uid, earlier))

    def attempts(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, tried again after a transient failure, up to ``max_attempts`` times."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except NotSent:
                raise
            except Exception as exc:
                failure = classify(exc, what)
                last = attempt >= self.config.max_attempts
                if not failure.transient or last or self.stop.is_set():
                    raise ObjectFailed(failure) from exc
            # Back off; a halt of the job (another upload failed for good) ends the wait.
            if self.stop.wait(backoff(attempt)):
                raise NotSent()

    def store(self, obj: LocalObject, data: bytes | None, sop_uid: str, earlier: bool) -> Done:
        """One try: HEAD (``skip_existing``, or a file delivered before), then the upload.

        On a second try the HEAD finds an object whose upload completed although its answer
        was lost, so it is not uploaded twice.
        """
        done = Done(obj, sop_uid, present=True)
        check = self.config.skip_existing or earlier
        if check and not self._head_refused:
            presence = existing(self.client, self.config.bucket, obj)
            if presence == Presence.SAME:
                return done
            if presence == Presence.REFUSED:
                self._head_refused = True  # ask no more in this call; said in run()
            if presence in (Presence.REFUSED, Presence.UNKNOWN) and earlier:
                return done  # delivered before and cannot be checked: trust the record
        elif earlier:
            return done
        if self.stop.is_set():
            raise NotSent()
        if data is None:
            multipart(
                self.client,
                self.config.bucket,
                obj,
                self.config.checksum,
                self.config.multipart_chunksize,
            )
        else:
            put(self.client, self.config.bucket, obj, data, self.config.checksum)
        if earlier:
            with self._lock:
                self.healed.append(obj.key)
        return Done(obj, sop_uid, present=False)

    def claim_key(self, key: str, name: str) -> None:
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ObjectFailed(
                Failure(
                    Scope.OBJECT,
                    f"{name}: key {key[:80]}... is longer than S3's {MAX_KEY_BYTES} bytes; "
                    "shorten prefix or key_pattern",
                )
            )
        with self._lock:
            other = self._keys.setdefault(key, name)
        if other != name:
            raise ObjectFailed(
                Failure(
                    Scope.OBJECT,
                    f"{name}: key {key} is also the key of {other}; add {{filename}} or "
                    "{SOPInstanceUID} to key_pattern",
                )
            )

    # -- the manifest --------------------------------------------------------------------

    def write_manifest(self, uploaded: dict[str, Done]) -> Failure | None:
        """Check the job's instances not in ``uploaded`` (stored by its last send), then upload
        the manifest of the whole job; the failure, or None once it is written."""
        earlier = [p for p in self.job.files if p.name not in uploaded]
        with self._lock:
            for name, stored in uploaded.items():
                self._keys.setdefault(stored.obj.key, name)
        self.index.add(earlier)
        checks = {self.pool.submit(self.upload, p, True): p.name for p in earlier}
        done = {p.name: uploaded[p.name] for p in self.job.files if p.name in uploaded}
        failure: Failure | None = None
        for future, name in checks.items():
            try:
                done[name] = future.result()
            except NotSent:
                failure = failure or self.stop_failure
            except ObjectFailed as exc:
                failure = failure or exc.failure
                if exc.failure.scope is not Scope.OBJECT:
                    self.halt(exc.failure)
        if failure is not None or self.stop_failure is not None:
            return failure or self.stop_failure
        if self.healed:
            self.log.warning(
                "S3 objects recorded as delivered were missing and were uploaded again",
                target=self.name,
                task_id=self.job.task_id,
                keys=sorted(self.healed)[:10],
                count=len(self.healed),
            )
        values = {**self.job.tags, "task_id": self.job.task_id, "target": self.name}
        key = self.config.object_key(self.config.manifest_key.render(values))
        if key in self._keys:
            return Failure(
                Scope.PERMANENT,
                f"manifest_key gives {key}, which is the key of the instance "
                f"{self._keys[key]}; choose another manifest_key",
            )
        entries = [
            manifest.Entry(d.obj.key, d.obj.size, d.obj.sha256_hex, d.sop_instance_uid, name)
            for name, d in done.items()
        ]
        body = manifest.render(
            target=self.name,
            task_id=self.job.task_id,
            bucket=self.config.bucket,
            tags=self.job.tags,
            entries=entries,
        )
        what = f"upload of the manifest to s3://{self.config.bucket}/{key}"
        try:
            self.attempts(
                what,
                lambda: put_bytes(
                    self.client,
                    self.config.bucket,
                    key,
                    body,
                    self.config.checksum,
                    manifest.CONTENT_TYPE,
                ),
            )
        except ObjectFailed as exc:
            return exc.failure
        except NotSent:
            return self.stop_failure or Failure(Scope.OBJECT, "manifest not sent")
        self.manifest_key = key
        self.log.info(
            "S3 manifest written",
            target=self.name,
            task_id=self.job.task_id,
            key=key,
            objects=len(entries),
            reuploaded_missing=len(self.healed),
        )
        return None
