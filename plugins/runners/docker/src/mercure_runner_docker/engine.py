"""The docker engine: a client from the settings, and images pulled only as the policy says.

mercure pulls a module's image at most once an hour (``pull_policy: "hourly"``). The time of
the last pull of each image is kept in the runner's state folder, so that several processor
processes sharing a spool, and a restarted one, keep to that bound together.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.tls import TLSConfig
from docker.utils import parse_repository_tag
from mercure.fsutil import atomic_write_bytes
from mercure.logs import get_logger
from mercure.runners import RunnerError, RunnerUnavailable

from mercure_runner_docker.settings import DockerRunnerSettings, PullPolicy

MONAI_MANIFEST = "/etc/monai/app.json"
"""Where a MONAI Application Package describes itself; mercure runs such images as root with
the manifest's command."""
PULL_INTERVAL = 3600.0
"""Seconds between two pulls of one image under ``pull_policy: "hourly"`` (mercure's)."""
log = get_logger("mercure.runner.docker")


def endpoint(settings: DockerRunnerSettings) -> str:
    """Where the engine is, for messages."""
    return settings.docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def make_client(settings: DockerRunnerSettings) -> docker.DockerClient:
    """A client for the configured engine; :class:`RunnerError` if the settings are unusable."""
    try:
        if not settings.docker_url and not settings.uses_tls:
            return docker.from_env(timeout=int(settings.api_timeout))
        tls: TLSConfig | bool = False
        if settings.uses_tls:
            for what in ("tls_ca_cert", "tls_client_cert", "tls_client_key"):
                path = getattr(settings, what)
                if path and not Path(path).is_file():
                    raise RunnerError(f"docker runner: {what} {path} is not a readable file")
            tls = TLSConfig(
                client_cert=(settings.tls_client_cert, settings.tls_client_key)
                if settings.tls_client_cert
                else None,
                ca_cert=settings.tls_ca_cert or None,
                verify=settings.tls_ca_cert or settings.tls_verify,
            )
        return docker.DockerClient(
            base_url=settings.docker_url or None, tls=tls, timeout=int(settings.api_timeout)
        )
    except DockerException as exc:
        # Asking the engine for its API version failed: it is down or restarting (try again
        # later); anything else is a setting the operator must fix.
        unreachable = exc.__cause__ is not None
        raise (RunnerUnavailable if unreachable else RunnerError)(
            f"cannot reach the docker engine at {endpoint(settings)}: {exc}"
        ) from None


class Images:
    """Makes sure a module's image is on the engine, pulling it only as the policy says."""

    def __init__(self, client: docker.DockerClient, state_file: Path | None, where: str) -> None:
        self.client = client
        self.state_file = state_file
        self.where = where
        self._lock = threading.Lock()
        self._memory: dict[str, float] = {}
        self._manifests: dict[str, dict[str, Any] | None] = {}

    def ensure(self, image: str, policy: PullPolicy) -> None:
        """Return once ``image`` is present; :class:`RunnerError` naming it if it cannot be."""
        present = self._present(image)
        if policy == "never" or (policy == "missing" and present):
            if not present:
                raise RunnerError(
                    f"image {image!r} is not on the docker engine at {self.where}: pull or "
                    f"load it there (docker pull {image}), or set the module's or runner's "
                    'pull_policy to "missing"'
                )
            return
        if policy == "hourly" and present and not self._due(image):
            return
        try:
            self._pull(image)
        except (APIError, DockerException) as exc:
            if present:
                log.info(
                    "could not check for a newer image; running the one the engine has "
                    "(normal for images that are not in a registry)",
                    image=image,
                    error=str(exc),
                )
                return
            raise RunnerError(
                f"image {image!r} is not on the docker engine at {self.where} and pulling it "
                f"failed: {exc}"
            ) from None

    def monai_manifest(self, image: str) -> dict[str, Any] | None:
        """The MONAI Application Package manifest of ``image``, or None if it is no MAP.

        Read from a created (never started) container, so nothing of the image runs.
        """
        try:
            image_id = str(self.client.images.get(image).id)
        except (APIError, DockerException) as exc:
            raise RunnerError(f"cannot inspect image {image!r} at {self.where}: {exc}") from None
        with self._lock:
            if image_id in self._manifests:
                return self._manifests[image_id]
        manifest: dict[str, Any] | None = None
        container = None
        try:
            container = self.client.api.create_container(
                image_id, entrypoint=[""], command=[""], network_disabled=True
            )
            stream, _stat = self.client.api.get_archive(container["Id"], MONAI_MANIFEST)
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.next()
                handle = tar.extractfile(member) if member is not None else None
                data = json.loads(handle.read()) if handle is not None else None
            manifest = data if isinstance(data, dict) else {}
        except NotFound:
            manifest = None
        except (APIError, DockerException, tarfile.TarError, ValueError) as exc:
            raise RunnerError(
                f"image {image!r} has {MONAI_MANIFEST}, but it cannot be read: {exc}"
            ) from None
        finally:
            if container is not None:
                with contextlib.suppress(APIError, DockerException):
                    self.client.api.remove_container(container["Id"], force=True)
        with self._lock:
            self._manifests[image_id] = manifest
        return manifest

    def _present(self, image: str) -> bool:
        try:
            self.client.images.get(image)
        except ImageNotFound:
            return False
        except (APIError, DockerException) as exc:
            server_side = isinstance(exc, APIError) and not exc.is_server_error()
            raise (RunnerError if server_side else RunnerUnavailable)(
                f"cannot ask the docker engine at {self.where} for image {image!r}: {exc}"
            ) from None
        return True

    def _pull(self, image: str) -> None:
        self._record(image)  # also a failed pull waits for the next hour, as in mercure
        repository, tag = parse_repository_tag(image)
        log.info("pulling image", image=image)
        for message in self.client.api.pull(
            repository, tag=tag or "latest", stream=True, decode=True
        ):
            if isinstance(message, dict) and message.get("error"):
                raise DockerException(str(message["error"]))

    def _due(self, image: str) -> bool:
        last = self._read().get(image, 0.0)
        return time.time() - last >= PULL_INTERVAL

    def _read(self) -> dict[str, float]:
        if self.state_file is None:
            return dict(self._memory)
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return dict(self._memory)
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _record(self, image: str) -> None:
        with self._lock:
            self._memory[image] = time.time()
            if self.state_file is None:
                return
            data = self._read()
            data[image] = time.time()
            with contextlib.suppress(OSError):
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.state_file, json.dumps(data).encode(), fsync=False)


__all__ = ["MONAI_MANIFEST", "PULL_INTERVAL", "Images", "endpoint", "make_client"]
