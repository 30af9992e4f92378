"""Peers and helpers for the DICOMweb target's tests.

* ``stow_server``: the DICOMweb test server of :mod:`stow_server`, for answers Orthanc cannot
  be made to give (per-instance failures, warnings, conflicts, 5xx, 429).
* ``orthanc_web``: one real Orthanc with its DICOMweb plugin for the whole session (tests use
  new UIDs, so they do not see each other's instances); ``orthanc_auth`` with HTTP basic
  authentication; ``orthanc_https`` with HTTPS that requires a client certificate.
* ``certs``: a CA (trustme) with a server certificate for 127.0.0.1 and a client certificate.

Helpers to import are in :mod:`dicomweb_helpers` (this folder is put on ``sys.path``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from mercure.testing import Orthanc, require_orthanc

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


@pytest.fixture(scope="session")
def orthanc_https(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Orthanc]:
    import ssl

    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_crt), str(certs.client_key))
    extra = {
        "SslEnabled": True,
        "SslCertificate": str(certs.server_pem),
        "SslVerifyPeers": True,
        "SslTrustedClientCertificates": str(certs.ca),
    }
    yield from _orthanc(tmp_path_factory.mktemp("orthanc-https"), extra=extra, ssl_context=context)
