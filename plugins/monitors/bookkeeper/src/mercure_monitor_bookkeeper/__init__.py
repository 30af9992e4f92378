"""mercure's bookkeeper as a monitor: the ledger's records posted to an existing bookkeeper.

Configured by mercure's own fields: ``bookkeeper`` (``host:port``, as mercure writes it, or
an ``http(s)://`` URL) and ``bookkeeper_api_key`` (which switches it on, as in mercure), or
under ``plugins.monitors.bookkeeper`` with ``address``, ``api_key``, ``timeout``. The ledger
service feeds it every record of the durable queue in order: while the bookkeeper is down the
records wait in the queue and are posted once it answers again (mercure's own client drops
them).
"""

from __future__ import annotations

from typing import Any

import httpx
from mercure import hookimpl
from mercure.ledger.records import LedgerRecord
from mercure.monitors import Monitor, MonitorError, PermanentMonitorError
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn
from mercure.secrets import Secret
from pydantic import Field, field_validator

from mercure_monitor_bookkeeper.events import Post, posts_for

# Answers that will never change for the same request: the record is skipped (logged).
REJECTED = {400, 404, 405, 413, 422}


class BookkeeperSettings(PluginSettings):
    address: str = "0.0.0.0:8080"
    """``host:port`` as in mercure's ``bookkeeper`` field, or a full ``http(s)://`` URL."""
    api_key: Secret
    """mercure's ``bookkeeper_api_key``, sent as ``Authorization: Token <key>``."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for the bookkeeper to answer one request."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value:
            raise ValueError("the bookkeeper address is empty; set it as host:port")
        return value

    @property
    def base_url(self) -> str:
        if self.address.startswith(("http://", "https://")):
            return self.address
        return f"http://{self.address}"


class BookkeeperMonitor(Monitor[BookkeeperSettings]):
    """Posts each record's requests; a failed request makes the whole record wait."""

    def start(self) -> None:
        self._client = httpx.Client(
            base_url=self.settings.base_url,
            headers={"Authorization": f"Token {self.settings.api_key}"},
            timeout=self.settings.timeout,
        )
        # Requests of a record already taken, so that a retry does not post them again.
        self._progress: dict[str, int] = {}

    def send(self, record: LedgerRecord) -> None:
        posts = posts_for(record, self.context.appliance_name)
        done = self._progress.get(record.id, 0)
        for index, post in enumerate(posts):
            if index < done:
                continue
            self._post(post)
            self._progress[record.id] = index + 1
        self._progress.pop(record.id, None)

    def _post(self, post: Post) -> None:
        try:
            response = self._client.post(f"/{post.endpoint}", **post.encoded())
        except httpx.HTTPError as exc:
            raise MonitorError(
                f"bookkeeper {self.settings.base_url} did not answer /{post.endpoint}: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        if response.status_code == 200:
            return
        text = response.text.strip()[:200]
        message = f"bookkeeper answered /{post.endpoint} with HTTP {response.status_code}: {text}"
        if response.status_code in (401, 403):
            message += " (check bookkeeper_api_key)"
        if response.status_code in REJECTED:
            raise PermanentMonitorError(message)
        raise MonitorError(message)

    def close(self) -> None:
        client: Any = getattr(self, "_client", None)
        if client is not None:
            client.close()


@hookimpl
def register_monitors(register: RegisterFn) -> None:
    register("bookkeeper", BookkeeperSettings, BookkeeperMonitor)


__all__ = ["BookkeeperMonitor", "BookkeeperSettings", "register_monitors"]
