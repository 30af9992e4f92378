"""Settings of a ``docker`` runner instance (``plugins.runners.docker``).

Every setting has a default that is safe: no image is pulled, modules run as the router's own
user (never root unless the module asks for it and ``support_root_modules`` allows it), with
all capabilities dropped and no network, and a module may only use the docker arguments and
volume folders the operator allowed here.
"""

from __future__ import annotations

import re
from typing import Literal

from mercure.plugin_settings import PluginSettings
from pydantic import Field, field_validator, model_validator

PullPolicy = Literal["never", "missing", "hourly", "always"]

DEFAULT_VOLUME_BASE = "/opt/mercure/processor_volumes"
"""mercure's base folder for a module's ``additional_volumes``."""

#: Keyword arguments of the docker SDK's ``containers.create`` that a module's
#: ``docker_arguments`` may set by default: resource limits, GPUs, an init process and the
#: command. None of them widens what a container can reach on the host.
DEFAULT_ALLOWED_ARGUMENTS = [
    "command",
    "entrypoint",
    "working_dir",
    "runtime",
    "device_requests",
    "mem_limit",
    "mem_reservation",
    "memswap_limit",
    "shm_size",
    "nano_cpus",
    "cpu_period",
    "cpu_quota",
    "cpu_shares",
    "cpuset_cpus",
    "cpuset_mems",
    "pids_limit",
    "ulimits",
    "read_only",
    "tmpfs",
    "init",
    "stop_signal",
    "hostname",
]

#: Arguments the runner sets itself; no allow-list can hand them to a module.
RESERVED_ARGUMENTS = frozenset(
    {
        "image",
        "name",
        "detach",
        "mounts",
        "volumes",
        "environment",
        "labels",
        "user",
        "group_add",
        "network_mode",
        "network",
        "network_disabled",
        "cap_drop",
        "auto_remove",
        "remove",
        "stdin_open",
        "tty",
        "userns_mode",
    }
)

_USER = re.compile(r"^\d+(:\d+)?$")


class DockerRunnerSettings(PluginSettings):
    """How the runner reaches the docker engine and how it runs every container."""

    docker_url: str = ""
    """The engine: ``unix:///run/docker.sock``, ``tcp://host:2376``; empty: the environment
    (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``), else the local socket."""
    tls: bool = False
    """Talk TLS to a ``tcp://`` engine (implied by any ``tls_*`` file)."""
    tls_verify: bool = True
    """Check the engine's certificate (against ``tls_ca_cert``, else the system's CAs)."""
    tls_ca_cert: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    api_timeout: float = Field(default=60.0, gt=0)
    """Seconds one call to the engine may take (an image pull has no limit)."""

    pull_policy: PullPolicy = "never"
    """``never``: use the image the engine has (a missing one fails the run, naming it);
    ``missing``: pull it when it is missing; ``hourly``: mercure's behaviour, pull at most once
    an hour per image (a failed pull of a present image goes on with it); ``always``: before
    every run (the same on failure). A module can set its own ``pull_policy``."""

    user: str = ""
    """``uid`` or ``uid:gid`` the containers run as; empty: the router's own user and group,
    or 65534:65534 (nobody) when the router runs as root."""
    mem_limit: str = ""
    """Memory limit of every container in docker's notation (``4g``, ``512m``); empty: none."""
    cpus: float | None = Field(default=None, gt=0)
    """CPU limit of every container (``1.5`` = one and a half cores); None: none."""
    pids_limit: int | None = Field(default=None, gt=0)
    """Most processes one container may have; None: the engine's default."""
    init: bool = True
    """Run docker's init process as PID 1: it passes the stop signal on to the module and
    reaps the processes the module leaves behind."""
    network_mode: str = ""
    """The network of modules with ``network_enabled`` (``bridge``, a network's name);
    empty: the engine's default. Modules without it get no network at all."""
    environment: dict[str, str] = {}
    """Variables every container gets (the module's own ``environment`` wins)."""

    volume_bases: list[str] = Field(default_factory=lambda: [DEFAULT_VOLUME_BASE])
    """Host folders whose contents a module's ``additional_volumes`` may mount."""
    allowed_docker_arguments: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_ARGUMENTS)
    )
    """Keys of a module's ``docker_arguments`` that are accepted; any other is an error when
    the configuration loads."""
    host_paths: dict[str, str] = {}
    """When the router runs in a container itself: a folder as the router sees it -> the same
    folder on the engine's host, for the bind mounts (longest prefix wins)."""
    chown_image: str = ""
    """Image whose ``chown`` gives a root module's output back to the router's user when the
    router does not run as root; empty: the module's own image."""

    kill_grace: float = Field(default=10.0, ge=0)
    """Seconds between SIGTERM and SIGKILL when a run is cancelled."""
    max_log_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """The end of a container's log that is handed back with the outcome."""

    @field_validator("user")
    @classmethod
    def _numeric_user(cls, value: str) -> str:
        if value and not _USER.match(value):
            raise ValueError("must be a numeric uid or uid:gid (names need the image's passwd)")
        return value

    @field_validator("volume_bases")
    @classmethod
    def _absolute_bases(cls, value: list[str]) -> list[str]:
        for base in value:
            if not base.startswith("/"):
                raise ValueError(f"{base!r} is not an absolute folder")
        return value

    @field_validator("allowed_docker_arguments")
    @classmethod
    def _no_reserved(cls, value: list[str]) -> list[str]:
        reserved = sorted(set(value) & RESERVED_ARGUMENTS)
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: set by the runner itself, a module cannot choose them"
            )
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> DockerRunnerSettings:
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("tls_client_cert and tls_client_key go together: set both or none")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca_cert or self.tls_client_cert)


__all__ = [
    "DEFAULT_ALLOWED_ARGUMENTS",
    "DEFAULT_VOLUME_BASE",
    "RESERVED_ARGUMENTS",
    "DockerRunnerSettings",
    "PullPolicy",
]
