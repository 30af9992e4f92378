"""The ``s3`` target: one client and one bounded set of upload threads per configured target.

``send`` may run in several dispatcher threads at once. They share the target's boto3 client
(thread-safe) and its upload pool, so ``parallel_uploads`` bounds the requests in flight to
the store for all jobs together, however many jobs are being sent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.targets import (
    DeliveryJob,
    DeliveryResult,
    PermanentTargetError,
    Target,
    TargetError,
)

from mercure_target_s3.client import build_client
from mercure_target_s3.config import S3TargetConfig
from mercure_target_s3.delivery import Delivery, Done
from mercure_target_s3.errors import Scope, classify, http_status

log = get_logger("mercure.target.s3")

#: Jobs whose uploads are remembered for their manifest (the oldest are forgotten first;
#: a forgotten job's instances are checked with HEAD instead).
REMEMBERED_JOBS = 256


class S3Target(Target[S3TargetConfig]):
    """Uploads each instance as one object; optionally a manifest once the series is complete.

    Streaming: while a series still arrives, the dispatcher hands the job over early and
    uploads start with the first instances (see :class:`~mercure_target_s3.delivery.Delivery`).
    """

    streaming = True

    def __init__(
        self, name: str, config: S3TargetConfig, context: PluginContext | None = None
    ) -> None:
        super().__init__(name, config, context)
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        # What the last send of each job stored (key, size, digest): finish() trusts these and
        # checks (HEAD) the instances delivered by earlier sends, which may have been removed.
        self._uploaded: OrderedDict[str, dict[str, Done]] = OrderedDict()

    @property
    def where(self) -> str:
        """The store, for messages: the endpoint, or Amazon S3 and its region."""
        if self.config.endpoint_url:
            return self.config.endpoint_url
        return f"Amazon S3 ({self.config.region or 'region from the environment'})"

    def client(self) -> Any:
        """The shared boto3 client, made on first use; raises :class:`TargetError`."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = build_client(self.config)
                except Exception as exc:
                    failure = classify(exc, f"S3 client for target {self.name} ({self.where})")
                    raise _error(failure.scope, failure.message) from exc
            return self._client

    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.config.parallel_uploads,
                    thread_name_prefix=f"s3-{self.name}",
                )
            return self._pool

    def _delivery(self, job: DeliveryJob) -> Delivery:
        return Delivery(
            name=self.name,
            config=self.config,
            client=self.client(),
            pool=self.pool(),
            job=job,
            log=log,
        )

    def send(self, job: DeliveryJob) -> DeliveryResult:
        delivery = self._delivery(job)
        result = delivery.run()
        if self.config.manifest and delivery.done:
            with self._lock:
                self._uploaded[job.task_id] = dict(delivery.done)
                self._uploaded.move_to_end(job.task_id)
                while len(self._uploaded) > REMEMBERED_JOBS:
                    self._uploaded.popitem(last=False)
        return result

    def finish(self, job: DeliveryJob) -> None:
        """Write the manifest of the complete series (``manifest: true``); until it is written
        the job stays in ``outgoing/`` and this is called again."""
        if not self.config.manifest:
            return
        with self._lock:
            uploaded = dict(self._uploaded.get(job.task_id, {}))
        failure = self._delivery(job).write_manifest(uploaded)
        if failure is not None:
            raise _error(failure.scope, f"manifest not written: {failure.message}")
        with self._lock:
            self._uploaded.pop(job.task_id, None)

    def test_connection(self) -> str:
        """HeadBucket; a refusal is looked up with a request whose answer has the reason."""
        client = self.client()
        bucket = self.config.bucket
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = http_status(exc)
            if status == 404:
                raise PermanentTargetError(
                    f"bucket {bucket} does not exist at {self.where}: create it or correct 'bucket'"
                ) from exc
            if 400 <= status < 500:
                raise self._reason_for_refusal(client) from exc
            failure = classify(exc, f"HeadBucket {bucket} at {self.where}")
            raise _error(failure.scope, failure.message) from exc
        except BotoCoreError as exc:
            failure = classify(exc, f"HeadBucket {bucket} at {self.where}")
            raise _error(failure.scope, failure.message) from exc
        source = "from boto3's chain" if self.config.uses_chain else "of the target"
        return f"bucket {bucket} at {self.where} answers; credentials {source} accepted"

    def _reason_for_refusal(self, client: Any) -> TargetError:
        """A HEAD answer has no body; ListObjectsV2 gives the service's code and message."""
        bucket = self.config.bucket
        what = f"access to bucket {bucket} at {self.where}"
        try:
            client.list_objects_v2(Bucket=bucket, Prefix=self.config.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            failure = classify(exc, what)
            return _error(failure.scope, failure.message)
        return PermanentTargetError(
            f"{what}: HeadBucket refused but listing allowed; grant s3:ListBucket on {bucket}"
        )

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            client.close()


def _error(scope: Scope, message: str) -> TargetError:
    return PermanentTargetError(message) if scope is Scope.PERMANENT else TargetError(message)
