"""A real Orthanc (with its DICOMweb plugin when installed) started for tests on free ports."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mercure.testing_peers import PeerProcess as PeerProcess
from mercure.testing_peers import port_accepts as port_accepts
from mercure.testing_postgres import PostgresServer as PostgresServer
from mercure.testing_ssh import OpenSSHServer as OpenSSHServer
from mercure.testing_ssh import SSHAccount as SSHAccount
from mercure.testing_ssh import processes_containing as processes_containing

if TYPE_CHECKING:
    pass


ORTHANC_BIN = Path(os.environ.get("MERCURE_ORTHANC", "/usr/sbin/Orthanc"))


ORTHANC_DICOMWEB_PLUGIN = Path(
    os.environ.get("MERCURE_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
)


def require_orthanc(dicomweb: bool = False) -> None:
    """Skip the calling test unless Orthanc (and, if asked, its DICOMweb plugin) is installed."""
    if not ORTHANC_BIN.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    if dicomweb and not ORTHANC_DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


@dataclass
class Orthanc:
    """A real Orthanc on free loopback ports with storage of its own, stopped by its PID.

    ``dicomweb`` loads the DICOMweb plugin (STOW-RS, QIDO-RS and WADO-RS under
    :attr:`dicomweb_url`); ``users`` turns HTTP basic authentication on (the first user is the
    one :meth:`request` uses); ``extra`` adds or overrides configuration keys (HTTPS, DICOM TLS,
    Lua scripts, ...), and ``ssl_context`` is what :meth:`request` uses over HTTPS.
    :meth:`restart` stops it and starts it again on the same ports and storage.
    """

    folder: Path
    http_port: int = 0
    dicom_port: int = 0
    aet: str = "ORTHANC"
    dicomweb: bool = False
    users: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # Ports picked here may be taken by another process before Orthanc binds them:
        # start() then picks new ones (only for ports it picked itself).
        self._own_ports = not (self.http_port or self.dicom_port)
        self.http_port = self.http_port or _free_port_on_all_interfaces()
        self.dicom_port = self.dicom_port or _free_port_on_all_interfaces()

    @property
    def url(self) -> str:
        scheme = "https" if self.extra.get("SslEnabled") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root: STOW-RS is ``POST {dicomweb_url}/studies``."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": "mercure-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": dict(self.users),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "Plugins": [],
        }
        if self.dicomweb:
            config["Plugins"] = [str(ORTHANC_DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "Host": f"127.0.0.1:{self.http_port}",
                "Ssl": bool(self.extra.get("SslEnabled")),
            }
        config.update(self.extra)
        return config

    def start(self, timeout: float = 60) -> Orthanc:
        require_orthanc(self.dicomweb)
        for attempt in range(3):
            try:
                return self._start(timeout)
            except _PortTaken:
                if not self._own_ports or attempt == 2:
                    raise
                self.http_port = _free_port_on_all_interfaces()
                self.dicom_port = _free_port_on_all_interfaces()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        started_log = self.log_path.stat().st_size if self.log_path.exists() else 0
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.configuration(), indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC_BIN), str(cfg)],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                output = self.log_path.read_bytes()[started_log:].decode(errors="replace")
                if "already in use" in output:
                    raise _PortTaken(f"Orthanc's port was taken: {output[-500:]}")
                raise RuntimeError(f"Orthanc exited early: {output[-2000:]}")
            try:
                self.get("/system")
                if _port_open(self.dicom_port):
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer GET /system within {timeout:g} s")

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request as the first registered user; returns status, headers and body."""
        all_headers = dict(headers or {})
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            all_headers.setdefault("Authorization", f"Basic {token}")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context) as rsp:
                return rsp.status, dict(rsp.headers.items()), rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def get(self, path: str) -> Any:
        """GET a REST path and decode its JSON; ``ValueError`` for an answer other than 200."""
        status, _, body = self.request("GET", path)
        if status != 200:
            raise ValueError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def sop_instance_uids(self) -> set[str]:
        """The SOP Instance UIDs Orthanc stores."""
        uids: set[str] = set()
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            uids.add(tags["SOPInstanceUID"])
        return uids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> Orthanc:
        self.stop()
        return self.start()

    def __enter__(self) -> Orthanc:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port_on_all_interfaces() -> int:
    """A port free on every address: Orthanc listens on all interfaces (traffic stays on
    loopback), so a port free on 127.0.0.1 alone may be taken on another address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


class _PortTaken(RuntimeError):
    """Orthanc could not bind a port that was free when it was picked."""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
