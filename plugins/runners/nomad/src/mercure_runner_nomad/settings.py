"""Settings of a ``nomad`` runner instance (``plugins.runners.nomad`` in ``mercure.json``).

mercure itself has no field for any of them (its Nomad support hard-coded the agent's
address), so every name here is the plugin's own; each has a default except where a cluster
cannot be guessed. See the README for what each one means on the Nomad side.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from mercure.plugin_settings import PluginSettings
from mercure.secrets import OptionalSecret
from pydantic import Field, field_validator, model_validator

from mercure_runner_nomad.hcl import HclError, parse_constraints

DEFAULT_ADDRESS = "http://127.0.0.1:4646"
#: Keys of the task's driver configuration that the runner sets itself.
RESERVED_TASK_CONFIG = frozenset({"image", "mount", "volumes", "network_mode"})


class NomadRunnerSettings(PluginSettings):
    """How the runner reaches Nomad, and the template of the jobs it registers."""

    address: str = DEFAULT_ADDRESS
    """Nomad's HTTP API (an agent or a server), as ``NOMAD_ADDR``: ``http(s)://host:4646``."""
    token: OptionalSecret = None
    """ACL token (``X-Nomad-Token``), best as ``${env:NOMAD_TOKEN}`` or ``${file:/path}``.
    It needs ``submit-job``, ``dispatch-job``, ``read-job`` and ``read-logs`` on ``namespace``."""
    namespace: str = "default"
    region: str = ""
    """Empty: the region of the agent at ``address``."""
    datacenters: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    """Where modules may run; ``*`` (every datacenter) needs Nomad 1.5 or newer."""
    ca_cert: str = ""
    """PEM file of the CA that signed Nomad's certificate (``NOMAD_CACERT``); empty: the
    system's trust store."""
    client_cert: str = ""
    """PEM client certificate for mutual TLS (``NOMAD_CLIENT_CERT``), with ``client_key``."""
    client_key: str = ""

    shared_folders: dict[str, str] = {}
    """The folders the router and the Nomad clients share, router path -> the same folder's
    path on the clients (``{"/opt/mercure/data": "/mnt/mercure/data"}``). A module's input
    and output folders (inside the job in ``processing/``) and its persistence folder must lie
    below one of them. Empty: the clients mount the shared folders at the router's paths."""

    driver: Literal["docker", "podman"] = "docker"
    """Nomad task driver that runs the module's ``docker_tag``."""
    task_config: dict[str, Any] = {}
    """More of the driver's ``config`` (``{"force_pull": true}``, ``{"auth": {...}}``); the
    runner sets ``image``, the mounts and ``network_mode`` itself."""
    user: str | None = None
    """The user the task runs as. ``None``: the router's own uid:gid, so that the results in
    the shared folder belong to the router; ``""``: the image's user. A module with
    ``requires_root`` runs as root when ``support_root_modules`` allows it."""
    environment: dict[str, str] = {}
    """Variables every module of this runner gets (a module's own ``environment`` wins)."""
    default_cpu: int = Field(default=500, ge=1)
    """MHz of CPU for a module whose ``resources`` do not set ``cpu`` or ``cores``."""
    default_memory: int = Field(default=1024, ge=10)
    """MB of memory for a module whose ``resources`` do not set ``memory``."""
    constraints: str = ""
    """Constraint and affinity blocks (HCL, as a module's ``constraints``) for every job."""
    priority: int = Field(default=50, ge=1, le=100)
    kill_timeout: float = Field(default=10.0, ge=0)
    """Seconds between the stop signal and SIGKILL when a run is cancelled."""
    job_prefix: str = Field(default="mercure", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,29}$")
    """Start of the registered jobs' ids: ``<prefix>-<module>-<hash of its definition>``."""

    placement_timeout: float = Field(default=600.0, gt=0)
    """Seconds a dispatched job may wait for Nomad to place it; then the run fails with
    Nomad's placement failure (constraints, exhausted resources) and the job is stopped."""
    poll_interval: float = Field(default=1.0, gt=0, le=60)
    """Seconds between two looks at a running job's allocations."""
    request_timeout: float = Field(default=30.0, gt=0)
    max_log_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """The end of each of the task's stdout and stderr fetched into the run's outcome."""
    keep_finished_jobs: bool = False
    """Keep a run's dispatched job in Nomad after its outcome was recorded (Nomad's garbage
    collector removes it later) instead of purging it at once."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (Nomad's HTTP API, port 4646)")
        return value

    @field_validator("shared_folders")
    @classmethod
    def _shared(cls, value: dict[str, str]) -> dict[str, str]:
        for router, client in value.items():
            for side, path in (("router", router), ("client", client)):
                if not os.path.isabs(path):
                    raise ValueError(f"{side} path {path!r} must be absolute")
        return {os.path.normpath(k): os.path.normpath(v) for k, v in value.items()}

    @field_validator("task_config")
    @classmethod
    def _task_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(RESERVED_TASK_CONFIG & set(value))
        if taken:
            raise ValueError(
                f"{', '.join(taken)} cannot be set here: the runner sets the image, the "
                "mounts of the module's folders and network_mode itself"
            )
        return value

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: str) -> str:
        try:
            parse_constraints(value)
        except HclError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> NomadRunnerSettings:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together: set both or neither")
        return self

    def task_user(self) -> str:
        """The task's ``User`` for a module that does not run as root."""
        if self.user is None:
            return f"{os.getuid()}:{os.getgid()}"
        return self.user


__all__ = ["DEFAULT_ADDRESS", "NomadRunnerSettings"]
