"""Peers and helpers for the DICOM target's tests.

* ``certs``: a CA, server and client certificates (trustme), plus a second, unrelated CA.
* ``RecordingSCP``: an in-process pynetdicom C-STORE SCP that records what each association
  delivered, and can answer chosen instances with a failure status or abort mid-transfer.
* ``orthanc_tls``: a real Orthanc whose DICOM port requires TLS with a client certificate
  (``orthanc`` and ``dispatch_env`` come from the core's pytest plugin, ``mercure.testing``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from mercure.testing import DcmtkStoreSCP, Orthanc, free_port
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    folder: Path
    ca: Path
    srv_key: Path
    srv_crt: Path
    cli_key: Path
    cli_crt: Path
    other_ca: Path
    other_cli_key: Path
    other_cli_crt: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA with a server (127.0.0.1) and a client certificate, and an unrelated second CA."""
    folder = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    srv = ca.issue_cert("127.0.0.1", "localhost")
    cli = ca.issue_cert("mercure-client.example")
    other_cli = other.issue_cert("stranger.example")
    paths = {
        "ca": (ca.cert_pem, "ca.crt"),
        "srv_key": (srv.private_key_pem, "srv.key"),
        "srv_crt": (srv.cert_chain_pems[0], "srv.crt"),
        "cli_key": (cli.private_key_pem, "cli.key"),
        "cli_crt": (cli.cert_chain_pems[0], "cli.crt"),
        "other_ca": (other.cert_pem, "other-ca.crt"),
        "other_cli_key": (other_cli.private_key_pem, "other-cli.key"),
        "other_cli_crt": (other_cli.cert_chain_pems[0], "other-cli.crt"),
    }
    for blob, name in paths.values():
        blob.write_to_path(str(folder / name))
    return Certs(folder, **{key: folder / name for key, (_, name) in paths.items()})


@pytest.fixture
def tls_storescp(tmp_path: Path, certs: Certs) -> Iterator[DcmtkStoreSCP]:
    """DCMTK storescp with TLS that requires a client certificate signed by ``certs.ca``."""
    scp = DcmtkStoreSCP(
        tmp_path / "tls-storescp",
        free_port(),
        extra_args=(
            "+tls",
            str(certs.srv_key),
            str(certs.srv_crt),
            "-pw",
            "+cf",
            str(certs.ca),
            "-rc",
        ),
    ).start()
    try:
        yield scp
    finally:
        scp.stop()


# -- in-process pynetdicom SCP ----------------------------------------------------------------


@dataclass
class RecordingSCP:
    """A pynetdicom C-STORE SCP that records, per association, the SOP Instance UIDs it stored.

    ``fail`` maps SOP Instance UIDs to the failure status to answer them with;
    ``abort_after`` ends the first association on the instance after that many were stored,
    with an A-ABORT (``drop="abort"``) or by closing the TCP connection (``drop="close"``);
    ``stall`` delays the answer to the first instance by that many seconds; ``syntaxes``
    limits the accepted transfer syntaxes.
    """

    fail: dict[str, int] = field(default_factory=dict)
    abort_after: int | None = None
    drop: str = "abort"
    stall: float = 0.0
    syntaxes: list[str] = field(default_factory=lambda: list(UNCOMPRESSED))
    ae_title: str = "RECORDER"
    require_called_aet: bool = False
    associations: list[list[str]] = field(default_factory=list)
    datasets: dict[str, bytes] = field(default_factory=dict)
    contexts: list[tuple[str, str]] = field(default_factory=list)
    calling_aets: list[str] = field(default_factory=list)
    called_aets: list[str] = field(default_factory=list)
    status_answered: dict[str, int] = field(default_factory=dict)
    server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _assoc_index: dict[int, int] = field(default_factory=dict)

    def start(self, ssl_context: Any = None) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, self.syntaxes)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)],
        )
        return self

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _accepted(self, event: Any) -> None:
        with self._lock:
            self._assoc_index[id(event.assoc)] = len(self.associations)
            self.associations.append([])
            self.calling_aets.append(str(event.assoc.requestor.ae_title).strip())
            self.called_aets.append(str(event.assoc.requestor.primitive.called_ae_title).strip())
            for cx in event.assoc.accepted_contexts:
                self.contexts.append((str(cx.abstract_syntax), str(cx.transfer_syntax[0])))

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if self.stall and not self.status_answered:
            time.sleep(self.stall)
        with self._lock:
            index = self._assoc_index[id(event.assoc)]
            stored = self.associations[index]
            if self.abort_after is not None and index == 0 and len(stored) >= self.abort_after:
                if self.drop == "close":
                    event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
                else:
                    event.assoc.abort()
                return 0xA700
            stored.append(uid)
            code = self.fail.get(uid, 0x0000)
            self.status_answered[uid] = code
            if code == 0x0000 or code >> 12 == 0xB:
                self.datasets[uid] = bytes(event.request.DataSet.getvalue())
        return code

    def stored(self) -> set[str]:
        """The SOP Instance UIDs stored (answered with success or warning)."""
        return set(self.datasets)


@pytest.fixture
def recording_scp() -> Iterator[Callable[..., RecordingSCP]]:
    started: list[RecordingSCP] = []

    def start(**kwargs: Any) -> RecordingSCP:
        ssl_context = kwargs.pop("ssl_context", None)
        scp = RecordingSCP(**kwargs).start(ssl_context)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# -- Orthanc (the class and the plain ``orthanc`` fixture are mercure.testing's) ----------


@pytest.fixture
def orthanc_tls(tmp_path: Path, certs: Certs) -> Iterator[Orthanc]:
    """Orthanc whose DICOM port speaks TLS only and requires a client certificate."""
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs.srv_crt),
        "DicomTlsPrivateKey": str(certs.srv_key),
        "DicomTlsTrustedCertificates": str(certs.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    server = Orthanc(tmp_path / "orthanc-tls", extra=tls).start()
    try:
        yield server
    finally:
        server.stop()
