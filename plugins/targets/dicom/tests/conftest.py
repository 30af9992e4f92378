"""Peers and helpers for the DICOM target's tests.

* ``certs``: a CA, server and client certificates (trustme), plus a second, unrelated CA.
* ``RecordingSCP``: an in-process pynetdicom C-STORE SCP that records what each association
  delivered, and can answer chosen instances with a failure status or abort mid-transfer.
* ``orthanc``: a real Orthanc started on free ports with its own storage, stopped by PID.
* ``make_job`` / ``run_dispatch``: a job in the spool delivered by the core's Dispatcher.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.plugins import build_plugin_manager
from mercure.services.dispatcher import Dispatcher
from mercure.services.runtime import Runtime, build_runtime
from mercure.testing import DcmtkStoreSCP, config_for, free_port
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ORTHANC = Path("/usr/sbin/Orthanc")
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


# -- Orthanc ----------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """A real Orthanc on free ports (DICOM and HTTP on 127.0.0.1 only)."""

    folder: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "mercure-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "Plugins": [],
            **self.extra,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(cfg)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited early: {(self.folder / 'orthanc.log').read_text()[-2000:]}"
                )
            try:
                self.get("/system")
                if _port_open(self.dicom_port):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer GET /system within 60 s")

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return json.loads(rsp.read())

    def sop_instance_uids(self) -> set[str]:
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


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_tls(tmp_path: Path, certs: Certs) -> Iterator[Orthanc]:
    """Orthanc whose DICOM port speaks TLS only and requires a client certificate."""
    if not ORTHANC.exists():
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs.srv_crt),
        "DicomTlsPrivateKey": str(certs.srv_key),
        "DicomTlsTrustedCertificates": str(certs.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    server = Orthanc(tmp_path / "orthanc-tls", free_port(), free_port(), extra=tls).start()
    try:
        yield server
    finally:
        server.stop()


# -- jobs through the core's dispatcher --------------------------------------------------------


class DispatchEnv:
    """A runtime and the core's Dispatcher over a spool in ``tmp_path``; jobs made by hand.

    Retries are due at once (``retry_delay`` 0) and each :meth:`deliver` is one synchronous
    delivery attempt, so tests follow a job try by try without waiting.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runtime: Runtime | None = None
        self.dispatcher: Dispatcher | None = None

    def start(self, targets: dict[str, Any], **overrides: Any) -> DispatchEnv:
        """(Re)build the runtime with these targets; jobs already in the spool stay."""
        self.close()
        overrides.setdefault("retry_delay", 0)
        overrides.setdefault("retry_max", 5)
        name = next(iter(targets))
        config = config_for(
            self.tmp_path,
            targets=targets,
            rules={"all": {"rule": "True", "target": name}},
            **overrides,
        )
        self.runtime = build_runtime(config, build_plugin_manager(), fsync=False)
        self.dispatcher = Dispatcher(self.runtime)
        return self

    def job(self, files: list[Path], target: str, tags: dict[str, str] | None = None) -> JobRef:
        """A job in ``outgoing/`` holding ``files`` for ``target``, as the router makes it."""
        assert self.runtime is not None
        tags = dict(tags or {})
        series_uid = tags.get("SeriesInstanceUID", "1.2.3")
        task = Task(
            info=TaskInfo(
                action="route",
                uid=series_uid,
                triggered_rules={"all": True},
                applied_rule="all",
                sender_address=tags.get("SenderAddress", "MISSING"),
            ),
            id=str(uuid.uuid4()),
            dispatch=TaskDispatch(target_name=target, series_uid=series_uid),
            tags=tags,
            created_at=time.time(),
        )
        return self.runtime.store.create("outgoing", task, files)

    def where(self, ref: JobRef) -> JobRef:
        assert self.runtime is not None
        found = self.runtime.store.find_exact(ref.id)
        assert found is not None, f"job {ref.id} vanished"
        return found

    def deliver(self, ref: JobRef) -> tuple[JobRef, Task]:
        """One delivery attempt; return the job's new place and its task file."""
        assert self.runtime is not None and self.dispatcher is not None
        self.dispatcher.deliver(self.where(ref))
        current = self.where(ref)
        return current, self.runtime.store.read(current)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None


@pytest.fixture
def dispatch_env(tmp_path: Path) -> Iterator[DispatchEnv]:
    env = DispatchEnv(tmp_path)
    yield env
    env.close()
