"""The few calls of Nomad's HTTP API the runner makes, with operator-readable errors.

Every request carries the namespace and region of the settings (``?namespace=&region=``) and
the ACL token (``X-Nomad-Token``). A 403 names the token setting (Nomad answers 403 for a
token that is unknown, expired or lacks a capability); other failures say what was asked,
of which server, and what it answered. One :class:`NomadAPI` is shared by every thread of a
runner (``httpx.Client`` is thread-safe).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any
from urllib.parse import quote

import httpx
from mercure.runners import RunnerError, RunnerUnavailable

from mercure_runner_nomad.settings import NomadRunnerSettings

#: The capability each call needs, for the message of a 403.
CAPABILITIES = {
    "register": "submit-job",
    "dispatch": "dispatch-job",
    "read": "read-job",
    "stop": "submit-job",
    "logs": "read-logs",
}


Scope = tuple[str, str] | None
"""(namespace, region) of a call; ``None``: the settings'. A run is followed in the
namespace and region it was dispatched to, even if the settings changed since."""


class _QuietPolls(logging.Filter):
    """Drops httpx's INFO line per request to Nomad: the runner polls every second or so.

    (The core quiets pynetdicom the same way; httpx's request lines belong there too.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.addresses: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not isinstance(record.args, tuple):
            return True
        url = str(record.args[1]) if len(record.args) > 1 else ""
        return not any(url.startswith(address) for address in self.addresses)


_quiet = _QuietPolls()
_quiet_lock = threading.Lock()


def quiet_request_logs(address: str) -> None:
    """Keep httpx from logging every request to ``address`` at INFO."""
    with _quiet_lock:
        logger = logging.getLogger("httpx")
        if _quiet not in logger.filters:
            logger.addFilter(_quiet)
        _quiet.addresses.add(address)


class NomadError(RunnerError):
    """Nomad answered with an error status (``status``) or could not be reached (``0``)."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NomadUnavailable(NomadError, RunnerUnavailable):
    """Nomad could not be reached (or its gateway said so): the processor launches again later."""


class NomadAPI:
    """A client of one Nomad cluster as the runner's settings describe it."""

    def __init__(self, settings: NomadRunnerSettings, instance: str = "nomad") -> None:
        self.settings = settings
        self.instance = instance
        headers = {"User-Agent": "mercure-runner-nomad"}
        if settings.token:
            headers["X-Nomad-Token"] = settings.token
        verify: ssl.SSLContext | bool = True
        if settings.ca_cert or settings.client_cert:
            verify = ssl.create_default_context(cafile=settings.ca_cert or None)
            if settings.client_cert:
                verify.load_cert_chain(settings.client_cert, settings.client_key)
        quiet_request_logs(settings.address)
        self.client = httpx.Client(
            base_url=settings.address,
            headers=headers,
            timeout=settings.request_timeout,
            verify=verify,
        )

    def close(self) -> None:
        self.client.close()

    # -- the calls ---------------------------------------------------------------------------

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """``PUT /v1/jobs``: register (or update) a job; Nomad's JobRegisterResponse."""
        return self._json("PUT", "/v1/jobs", "register", "registering a job", json=body)

    def dispatch(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/job/<id>/dispatch``; Nomad's JobDispatchResponse."""
        return self._json(
            "POST", f"{_job(job_id)}/dispatch", "dispatch", f"dispatching {job_id}", json=body
        )

    def job(self, job_id: str, scope: Scope = None) -> dict[str, Any] | None:
        """``GET /v1/job/<id>``; ``None`` if Nomad has no such job (purged, collected)."""
        try:
            return self._json("GET", _job(job_id), "read", f"reading job {job_id}", scope=scope)
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise

    def allocations(self, job_id: str, scope: Scope = None) -> list[dict[str, Any]]:
        """``GET /v1/job/<id>/allocations``: the job's allocation stubs."""
        found = self._json(
            "GET",
            f"{_job(job_id)}/allocations",
            "read",
            f"listing allocations of {job_id}",
            scope=scope,
        )
        return found if isinstance(found, list) else []

    def evaluations(self, job_id: str, scope: Scope = None) -> list[dict[str, Any]]:
        """``GET /v1/job/<id>/evaluations``: the job's evaluations (placement results)."""
        found = self._json(
            "GET",
            f"{_job(job_id)}/evaluations",
            "read",
            f"listing evaluations of {job_id}",
            scope=scope,
        )
        return found if isinstance(found, list) else []

    def stop(self, job_id: str, purge: bool = False, scope: Scope = None) -> dict[str, Any]:
        """``DELETE /v1/job/<id>``: stop the job (kill its tasks); ``purge`` also removes it."""
        params = {"purge": "true"} if purge else {}
        what = f"{'purging' if purge else 'stopping'} job {job_id}"
        return self._json("DELETE", _job(job_id), "stop", what, params=params, scope=scope)

    def logs(self, alloc_id: str, task: str, kind: str, limit: int, scope: Scope = None) -> bytes:
        """The last ``limit`` bytes of a task's ``stdout`` or ``stderr``.

        ``GET /v1/client/fs/logs/<alloc>`` with ``plain=true`` (the raw bytes, not frames),
        ``origin=end`` and ``offset=limit``; Nomad forwards it to the client that ran it.
        """
        params = {
            "task": task,
            "type": kind,
            "origin": "end",
            "offset": str(limit),
            "plain": "true",
        }
        response = self._request(
            "GET",
            f"/v1/client/fs/logs/{quote(alloc_id, safe='')}",
            "logs",
            f"fetching the {kind} of allocation {alloc_id}",
            params=params,
            scope=scope,
        )
        return response.content

    # -- plumbing ----------------------------------------------------------------------------

    def _json(self, method: str, path: str, action: str, what: str, **kwargs: Any) -> Any:
        response = self._request(method, path, action, what, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise NomadError(
                f"Nomad at {self.settings.address} answered {what} with something that is not "
                f"JSON: {response.text[:200]!r}",
                response.status_code,
                response.text,
            ) from None

    def _request(
        self, method: str, path: str, action: str, what: str, scope: Scope = None, **kwargs: Any
    ) -> httpx.Response:
        namespace, region = scope or (self.settings.namespace, self.settings.region)
        params = {"namespace": namespace}
        if region:
            params["region"] = region
        params.update(kwargs.pop("params", {}))
        try:
            response = self.client.request(method, path, params=params, **kwargs)
        except httpx.HTTPError as exc:
            raise NomadUnavailable(
                f"cannot reach Nomad at {self.settings.address} ({what}): "
                f"{exc.__class__.__name__}: {exc}; check plugins.runners.{self.instance}.address "
                "and that the Nomad agent runs"
            ) from exc
        if response.status_code < 400:
            return response
        body = response.text.strip()
        if response.status_code == 403:
            setting = f"plugins.runners.{self.instance}.token"
            namespace = self.settings.namespace
            if self.settings.token:
                problem = (
                    f"the ACL token in {setting} is unknown, expired or lacks the "
                    f"{CAPABILITIES.get(action, action)} capability in namespace '{namespace}'"
                )
            else:
                problem = f"no ACL token is set ({setting}) and Nomad does not allow anonymous use"
            raise NomadError(
                f"Nomad at {self.settings.address} refused {what}: 403 {body or 'Forbidden'}; "
                f"{problem}; give the runner a valid token with submit-job, dispatch-job, "
                f"read-job and read-logs on namespace '{namespace}'",
                403,
                body,
            )
        # Nomad answers 500 for invalid requests too; only a gateway's 502-504 means "later".
        unavailable = response.status_code in (502, 503, 504)
        raise (NomadUnavailable if unavailable else NomadError)(
            f"Nomad at {self.settings.address} answered {what} with "
            f"{response.status_code}: {body[:500] or response.reason_phrase}",
            response.status_code,
            body,
        )


def _job(job_id: str) -> str:
    # Dispatched jobs have a '/' in their id (<parent>/dispatch-<time>-<id>): escape it.
    return f"/v1/job/{quote(job_id, safe='')}"


__all__ = ["NomadAPI", "NomadError", "Scope"]
