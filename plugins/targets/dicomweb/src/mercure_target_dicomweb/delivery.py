"""One delivery attempt: batches, STOW-RS requests, and what each answer means per instance.

* Pending instances are sent in batches bounded by ``batch_max_instances`` and
  ``batch_max_bytes``, each one multipart/related request streamed from the files.
* While a series still arrives (``DeliveryJob.more``), a batch goes out as soon as it is full,
  when no new instance came for half a second, or when its first instance waited two
  seconds; after five quiet seconds the attempt ends and the dispatcher hands the job back
  when more instances arrive.
* Every answer is read per SOP Instance UID: an instance is delivered only when the server
  lists it in ReferencedSOPSequence; one in FailedSOPSequence, or missing from both, stays
  pending with the reason, so the next attempt sends only it. Warnings are logged.
* A conflict (409, or reason 0x0111 Duplicate SOP Instance) counts as delivered only when
  WADO-RS shows the server's copy is identical (:mod:`.verify`); a different copy is a
  permanent failure.
* 401, 403, the other 4xx that cannot succeed and certificate problems end the attempt as
  permanent: the job goes to ``error/`` at once with the server's reason. 5xx, 408, 429 and
  network failures end it as retryable; ``Retry-After`` is honoured (waited for within the
  attempt up to ``retry_after_max_wait``, otherwise no request is made before it has passed).
* A 400 or 413 that names no instance, for a batch of several, is retried one instance per
  request in the same attempt, so one instance the server refuses cannot hold back the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from mercure.instances import InstanceInfo
from mercure.logs import get_logger
from mercure.targets import DeliveryJob, DeliveryResult, MoreFiles

from mercure_target_dicomweb.http import (
    Answer,
    describe_transport_error,
    retry_after,
    tls_problem,
)
from mercure_target_dicomweb.multipart import BodyChanged, Part, StowBody
from mercure_target_dicomweb.response import (
    DUPLICATE_SOP_INSTANCE,
    StowAnswer,
    describe_reason,
    parse_answer,
)
from mercure_target_dicomweb.verify import compare_with_server

if TYPE_CHECKING:
    from mercure_target_dicomweb.target import DicomWebTarget

log = get_logger("mercure.target.dicomweb")

#: Seconds without a new instance of an arriving series before the attempt ends.
STREAM_IDLE_RELEASE = 5.0
#: Seconds without a new instance before a partial batch of an arriving series is sent.
STREAM_FLUSH = 0.5
#: Longest an instance of a slowly arriving series waits for its batch to fill.
STREAM_MAX_WAIT = 2.0
#: Most waits for Retry-After within one request.
MAX_INLINE_WAITS = 3

PERMANENT_HINTS = {
    401: "the server rejected the credentials: check http_user/http_password or access_token",
    403: "the server refuses this user access to STOW-RS: check its permissions",
    404: "no STOW-RS service at this address: check url and stow_url_prefix",
    405: "the server does not accept STOW-RS (POST) here: check url and stow_url_prefix",
    406: "the server cannot answer in application/dicom+json",
    410: "the STOW-RS service is gone from this address: check url",
    415: "the server does not accept multipart/related application/dicom uploads",
}


def take_batch(
    queue: list[InstanceInfo], max_count: int, max_bytes: int
) -> tuple[list[InstanceInfo], bool]:
    """The first batch of ``queue`` and whether it is full (no further instance would fit)."""
    batch: list[InstanceInfo] = []
    size = 0
    for info in queue:
        if batch and (len(batch) >= max_count or size + info.size > max_bytes):
            return batch, True
        batch.append(info)
        size += info.size
    return batch, len(batch) >= max_count or size >= max_bytes


class Delivery:
    """The state of one ``send``: what was delivered, what failed and why, and whether to stop."""

    def __init__(self, target: DicomWebTarget, job: DeliveryJob) -> None:
        self.target = target
        self.config = target.config
        self.job = job
        self.index = job.index()
        self.log = log.bind(target=target.name, task_id=job.task_id)
        self.delivered: list[str] = []
        self.failed: dict[str, str] = {}
        self.error: str | None = None
        self.permanent = False
        self.stopped = False
        self.queue: list[InstanceInfo] = []
        self.requests = 0

    # -- the attempt ------------------------------------------------------------------------

    def run(self) -> DeliveryResult:
        self._enqueue(self.job.files)
        self._flush(force=self.job.more is None)
        if self.job.more is not None:
            self._stream(self.job.more)
        self._flush(force=True)
        self.log.info(
            "STOW-RS finished",
            url=self.config.stow_url,
            delivered=len(self.delivered),
            failed=len(self.failed),
            requests=self.requests,
        )
        return DeliveryResult(
            delivered=list(self.delivered),
            failed=dict(self.failed),
            error=self.error,
            permanent=self.permanent,
        )

    def _stream(self, more: MoreFiles) -> None:
        last_new = time.monotonic()
        waiting_since = time.monotonic()  # when the oldest queued instance was queued
        while not self.stopped:
            idle_left = STREAM_IDLE_RELEASE - (time.monotonic() - last_new)
            if idle_left <= 0:
                break
            wait = min(idle_left, STREAM_FLUSH)
            asked_at = time.monotonic()
            new = more(wait)
            if new is None:
                break
            if not new:
                if time.monotonic() - asked_at < wait / 2:
                    break  # ``more`` answers "nothing" at once only when the dispatcher stops
                self._flush(force=True)  # a pause in arrival: send what waits
                continue
            last_new = time.monotonic()
            if not self.queue:
                waiting_since = last_new
            self._enqueue(new)
            self._flush(force=last_new - waiting_since >= STREAM_MAX_WAIT)
            if not self.queue:
                waiting_since = time.monotonic()

    def _enqueue(self, files: Iterable[Path]) -> None:
        for path in files:
            info = self.index.by_name(path.name)
            if info is None and path.name not in self.index.unreadable:
                self.index.add([path])
                info = self.index.by_name(path.name)
            if info is None:
                reason = self.index.unreadable.get(path.name, "cannot be read")
                self.failed[path.name] = f"not sent: {reason}"
                continue
            self.queue.append(info)

    def _flush(self, force: bool) -> None:
        while self.queue and not self.stopped:
            batch, full = take_batch(
                self.queue, self.config.batch_max_instances, self.config.batch_max_bytes
            )
            if not full and not force:
                break  # a partial batch of an arriving series: wait for more instances
            del self.queue[: len(batch)]
            self._send(batch)
            if self.job.confirm is not None and self.delivered:
                self.job.confirm(list(self.delivered))
        if self.stopped:
            for info in self.queue:
                self.failed.setdefault(info.name, f"not sent: {self.error}")
            self.queue.clear()

    def _stop(self, reason: str, batch: Iterable[InstanceInfo], permanent: bool = False) -> None:
        """No further request in this attempt; ``batch`` failed with ``reason``."""
        self.error = reason
        self.stopped = True
        self.permanent = self.permanent or permanent
        for info in batch:
            self.failed.setdefault(info.name, reason)

    # -- one request ------------------------------------------------------------------------

    def _send(self, batch: list[InstanceInfo]) -> None:
        if not self._wait_for_retry_after(batch):
            return
        body = StowBody(Part(i.path, i.size) for i in batch)
        url = self.config.stow_url
        waits = 0
        while True:
            try:
                answer = self.target.post_stow(body)
            except BodyChanged as exc:
                for info in batch:
                    self.failed[info.name] = f"not sent: {exc}"
                return
            except httpx.TransportError as exc:
                # A certificate problem will not pass by itself: like wrong credentials.
                permanent = tls_problem(exc) is not None
                text = describe_transport_error(url, exc, self.config.timeout)
                self._stop(text, batch, permanent=permanent)
                return
            self.requests += 1
            if answer.status not in (429, 503):
                break
            delay = retry_after(answer.headers)
            busy = f"HTTP {answer.status} {answer.reason}".strip()
            if (
                delay is not None
                and delay <= self.config.retry_after_max_wait
                and waits < MAX_INLINE_WAITS
            ):
                waits += 1
                self.log.info(
                    "server busy; waiting as Retry-After asks", status=answer.status, seconds=delay
                )
                if not self.target.pause(delay):
                    self._stop(f"{busy}; the router is stopping", batch)
                    return
                continue
            if delay is not None:
                self.target.hold(delay)
                self._stop(
                    f"{busy}: the server asked to wait {delay:.0f} s (Retry-After); no request "
                    "is made before then",
                    batch,
                )
            else:
                self._stop(f"{busy}: the server is busy; {answer.text()}".rstrip("; "), batch)
            return
        self._judge(batch, answer)

    def _wait_for_retry_after(self, batch: list[InstanceInfo]) -> bool:
        left = self.target.hold_left()
        if left <= 0:
            return True
        if left <= self.config.retry_after_max_wait:
            if self.target.pause(left):
                return True
            self._stop("the router is stopping", batch)
            return False
        self._stop(
            f"the server asked to wait (Retry-After); {left:.0f} s remain, no request before",
            batch,
        )
        return False

    def _judge(self, batch: list[InstanceInfo], answer: Answer) -> None:
        """What ``answer`` means for each instance of ``batch``."""
        status = answer.status
        label = f"HTTP {status} {answer.reason}".strip()
        said = answer.text()
        quoted = f" ({said})" if said else ""
        if status in (401, 403):
            self._stop(f"{label}: {PERMANENT_HINTS[status]}{quoted}", batch, permanent=True)
            return
        parsed = parse_answer(answer.body, answer.content_type)
        if parsed.readable:
            self._per_instance(batch, parsed, status)
            if status >= 500:
                self._stop(f"{label} (server error): {said}", [])
            return
        if 200 <= status < 300:
            reason = (
                f"the server answered {label} without saying which instances it stored "
                f"(content type '{answer.content_type}')"
            )
            for info in batch:
                self.failed[info.name] = reason
            return
        if status == 409:
            self._verify([(info, f"{label} (conflict)") for info in batch])
            return
        if status in (400, 413) and len(batch) > 1:
            self.log.info(
                "server refused a batch without saying why; sending its instances one by one",
                status=status,
                instances=len(batch),
            )
            for info in batch:
                if self.stopped:
                    self.failed.setdefault(info.name, f"not sent: {self.error}")
                else:
                    self._send([info])
            return
        if status in (400, 413):
            info = batch[0]
            what = "too large for the server" if status == 413 else "refused as malformed"
            self.failed[info.name] = (
                f"{label}: SOP Instance {info.sop_instance_uid} ({info.size} bytes) {what}: "
                f"{said}".rstrip(": ")
            )
            self.permanent = True
            return
        if status in (408,) or status >= 500:
            self._stop(f"{label}: {said}".rstrip(": "), batch)
            return
        if 300 <= status < 400:
            where = answer.headers.get("location", "?")
            hint = f"the server redirects to {where}: set url to the address it names"
            self._stop(f"{label}: {hint}", batch, permanent=True)
            return
        hint = PERMANENT_HINTS.get(status, "the server refuses the request as it is configured")
        self._stop(f"{label}: {hint}{quoted}", batch, permanent=True)

    def _per_instance(self, batch: list[InstanceInfo], parsed: StowAnswer, status: int) -> None:
        to_verify: list[tuple[InstanceInfo, str]] = []
        for info in batch:
            uid = info.sop_instance_uid
            if uid in parsed.failed:
                code = parsed.failed[uid]
                why = (
                    f"the server refused SOP Instance {uid}: {describe_reason(code)} "
                    f"(HTTP {status})"
                )
                if code == DUPLICATE_SOP_INSTANCE or status == 409:
                    to_verify.append((info, why))
                else:
                    self.failed[info.name] = why
            elif uid in parsed.stored:
                self.delivered.append(info.name)
                code = parsed.warnings.get(uid, parsed.warning)
                if uid in parsed.warnings or parsed.warning is not None:
                    self.log.warning(
                        "instance stored with a warning",
                        file=info.name,
                        sop_instance_uid=uid,
                        warning=describe_reason(code),
                    )
            elif status == 409:
                to_verify.append((info, f"HTTP 409 (conflict) for SOP Instance {uid}"))
            else:
                self.failed[info.name] = (
                    f"the server's answer (HTTP {status}) does not list SOP Instance {uid} as "
                    "stored"
                )
        self._verify(to_verify)

    def _verify(self, items: list[tuple[InstanceInfo, str]]) -> None:
        """Count a conflicting instance as delivered only if the server's copy is identical."""
        for info, why in items:
            try:
                tags = self.index.tags(info.name, ("StudyInstanceUID", "SeriesInstanceUID"))
            except (OSError, ValueError, KeyError) as exc:
                self.failed[info.name] = f"{why}; cannot read its study and series UIDs: {exc}"
                continue
            study, series = tags.get("StudyInstanceUID"), tags.get("SeriesInstanceUID")
            if not study or not series:
                self.failed[info.name] = f"{why}; it has no study or series UID to look it up"
                continue
            url = (
                f"{self.config.wado_base}/studies/{study}/series/{series}/instances/"
                f"{info.sop_instance_uid}"
            )
            verdict = compare_with_server(self.target.client, url, info.path, self.config.timeout)
            if verdict.outcome == "identical":
                self.delivered.append(info.name)
                self.log.info(
                    "conflict: the server already holds this instance, identical",
                    file=info.name,
                    sop_instance_uid=info.sop_instance_uid,
                )
            elif verdict.outcome == "different":
                self.failed[info.name] = (
                    f"{why}; {verdict.detail}: it is not overwritten; resolve the conflict at "
                    "the server, then `mercure job retry`"
                )
                self.permanent = True
            else:
                self.failed[info.name] = f"{why}; not confirmed as already stored: {verdict.detail}"
