"""Peers and helpers for the DICOMweb target's tests.

* ``stow_server``: the DICOMweb test server of :mod:`stow_server`, for answers Orthanc cannot
  be made to give (per-instance failures, warnings, conflicts, 5xx, 429).
* ``orthanc_web``: one real Orthanc with its DICOMweb plugin for the whole session (tests use
  new UIDs, so they do not see each other's instances); ``orthanc_auth`` with HTTP basic
  authentication; ``orthanc_https``: that Orthanc behind a TLS proxy (stunnel) that requires
  a client certificate.
* ``certs``: a CA (trustme) with a server certificate for 127.0.0.1 and a client certificate.

Helpers to import are in :mod:`dicomweb_helpers` (this folder is put on ``sys.path``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from mercure.testing import Orthanc, free_port, require_orthanc

sys.path.insert(0, str(Path(__file__).parent))

from dicomweb_stow_server import StowServer


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    server = StowServer().start()
    yield server
    server.stop()


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_pem: Path  # certificate and key in one file, as Orthanc wants it
    client_crt: Path
    client_key: Path
    other_ca: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("mercure-client.example")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    pem = folder / "server.pem"
    pem.write_bytes(server.cert_chain_pems[0].bytes() + server.private_key_pem.bytes())
    client.cert_chain_pems[0].write_to_path(str(folder / "client.crt"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    return Certs(
        folder / "ca.pem",
        pem,
        folder / "client.crt",
        folder / "client.key",
        other_ca=folder / "other-ca.pem",
    )


def _orthanc(folder: Path, **kwargs: Any) -> Iterator[Orthanc]:
    require_orthanc(dicomweb=True)
    server = Orthanc(folder, dicomweb=True, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    yield from _orthanc(tmp_path_factory.mktemp("orthanc-web"))


@pytest.fixture(scope="session")
def orthanc_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    yield from _orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={"router": "s3cret"})


STUNNEL = Path("/usr/bin/stunnel4")


@dataclass
class HttpsOrthanc:
    """A real Orthanc behind stunnel (OpenSSL), which requires a client certificate.

    Orthanc's own HTTPS (civetweb) drops every TLS connection in Debian's orthanc 1.10 build
    here, so TLS is terminated the way many sites do it: by a proxy in front of Orthanc.
    """

    orthanc: Orthanc
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def dicomweb_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dicom-web"

    def sop_instance_uids(self) -> set[str]:
        return self.orthanc.sop_instance_uids()


@pytest.fixture(scope="session")
def orthanc_https(
    tmp_path_factory: pytest.TempPathFactory, orthanc_web: Orthanc, certs: Certs
) -> Iterator[HttpsOrthanc]:
    if not STUNNEL.exists():
        pytest.skip("stunnel is not installed (apt-get install stunnel4)")
    folder = tmp_path_factory.mktemp("stunnel")
    port = free_port()
    conf = folder / "stunnel.conf"
    conf.write_text(
        "foreground = yes\n"
        f"pid = {folder / 'stunnel.pid'}\n"
        "[dicomweb]\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{orthanc_web.http_port}\n"
        f"cert = {certs.server_pem}\n"
        f"CAfile = {certs.ca}\n"
        "verifyChain = yes\n"
        "requireCert = yes\n"
    )
    with open(folder / "stunnel.log", "wb") as log:
        proc = subprocess.Popen([str(STUNNEL), str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stunnel exited: {(folder / 'stunnel.log').read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("stunnel did not listen within 20 s")
            time.sleep(0.05)
        yield HttpsOrthanc(orthanc_web, port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
