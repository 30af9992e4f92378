"""The ``dicomweb`` target: STOW-RS with one keep-alive HTTP client per target."""

from __future__ import annotations

import threading
import time

import httpx
from mercure.lifecycle import PluginContext
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetError

from mercure_target_dicomweb.config import DicomWebTargetConfig
from mercure_target_dicomweb.delivery import PERMANENT_HINTS, Delivery
from mercure_target_dicomweb.http import Answer, build_client, describe_transport_error, read_answer
from mercure_target_dicomweb.multipart import StowBody

STOW_ACCEPT = "application/dicom+json"
QIDO_ACCEPT = "application/dicom+json"


class DicomWebTarget(Target[DicomWebTargetConfig]):
    """Delivers instances with STOW-RS; see :mod:`mercure_target_dicomweb.delivery`.

    Streaming: while a series still arrives, the dispatcher hands the job over early and
    batches go out as they fill, over the same connection.
    """

    streaming = True

    def __init__(
        self, name: str, config: DicomWebTargetConfig, context: PluginContext | None = None
    ) -> None:
        super().__init__(name, config, context)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._hold_until = 0.0  # monotonic time before which Retry-After asked not to send

    @property
    def client(self) -> httpx.Client:
        """The target's HTTP client, made on first use and kept (with its connections)."""
        with self._lock:
            if self._client is None:
                self._client = build_client(self.name, self.config)
            return self._client

    def post_stow(self, body: StowBody) -> Answer:
        """POST one multipart body to the STOW-RS URL; the body is read from disk as it goes."""
        headers = {**body.headers, "Accept": STOW_ACCEPT}
        with self.client.stream("POST", self.config.stow_url, content=body, headers=headers) as rsp:
            return read_answer(rsp)

    def send(self, job: DeliveryJob) -> DeliveryResult:
        return Delivery(self, job).run()

    # -- Retry-After, shared by the target's jobs ----------------------------------------------

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the server's Retry-After)."""
        with self._lock:
            self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    def hold_left(self) -> float:
        with self._lock:
            return self._hold_until - time.monotonic()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False if the target is being closed meanwhile."""
        return not self._closing.wait(max(0.0, seconds))

    # -- operations ---------------------------------------------------------------------------

    def test_connection(self) -> str:
        """A QIDO-RS study search (``limit=1``): proves reachability and the credentials."""
        url = f"{self.config.qido_base}/studies"
        started = time.perf_counter()
        try:
            with self.client.stream(
                "GET", url, params={"limit": "1"}, headers={"Accept": QIDO_ACCEPT}
            ) as rsp:
                answer = read_answer(rsp)
        except httpx.TransportError as exc:
            raise TargetError(
                f"QIDO-RS {url}: {describe_transport_error(url, exc, self.config.timeout)}"
            ) from exc
        elapsed = (time.perf_counter() - started) * 1000
        label = f"HTTP {answer.status} {answer.reason}".strip()
        if answer.status in (200, 204):
            auth = {"basic": "basic authentication", "bearer": "a bearer token"}.get(
                self.config.auth_kind, "no credentials"
            )
            return f"QIDO-RS {url} answered {label} in {elapsed:.0f} ms with {auth}"
        hint = PERMANENT_HINTS.get(answer.status, "check url and qido_url_prefix")
        if answer.status == 404:
            hint = "no QIDO-RS service at this address: check url and qido_url_prefix"
        said = f" ({answer.text()})" if answer.text() else ""
        raise TargetError(f"QIDO-RS {url} answered {label}: {hint}{said}")

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
