"""Pytest fixtures and helpers for testing mercure and its plugins (entry point ``pytest11``).

Fixtures:

* ``plugin_manager`` - a fresh :class:`~mercure.plugins.PluginManager` with the built-ins only.
* ``register_plugin`` - register a plugin object on that manager for one test.
* ``synthetic_series`` - a folder of small synthetic CT instances (one series).
* ``mercure_config`` - a :class:`~mercure.config.Config` whose spool lives in ``tmp_path``.
* ``running_router`` - all services of a router in this process, on a free port.
* ``dcmtk_storescp`` - DCMTK's ``storescp`` on a free port, writing into a folder.
* ``dispatch_env`` - the core's Dispatcher over a spool in ``tmp_path``, jobs made by hand.
* ``orthanc`` - a real Orthanc (with its DICOMweb plugin when installed) on free ports.
* ``postgres_server`` (session) - Debian's PostgreSQL on a free loopback port (run as the
  ``postgres`` user when the tests run as root); ``create_database()`` gives a fresh one;
  see :mod:`mercure.testing_postgres`.
* ``ssh_account`` / ``openssh_server`` (session) - a local test user and OpenSSH's sshd on a
  free loopback port that lets it in (password or key); see :mod:`mercure.testing_ssh`.
* ``ssh_known_hosts`` (a known_hosts file trusting ``openssh_server``), ``ssh_destination``
  (a fresh folder the test user owns), ``own_openssh_server`` (an sshd for one test, to kill
  or re-key).

Helpers: :func:`make_series`, :func:`free_port`, :func:`wait_for`, :class:`DcmtkStoreSCP`,
:func:`dcmtk_storescu`, :class:`DispatchEnv`, :class:`~mercure.testing_ssh.OpenSSHServer`,
:func:`~mercure.testing_ssh.processes_containing`, :func:`store_instances` (a C-STORE SCU
without DCMTK), :func:`start_router` (with a manager holding test plugins such as an
:class:`EventRecorder`), :func:`outbox_records` and :func:`wait_for_notifications` (for
notifier plugins), :class:`PeerProcess` and :func:`port_accepts` (a real server started for
the tests and stopped by its PID), :func:`folder_router` (a router on loopback that delivers
everything to one folder target), :class:`Orthanc` and :func:`require_orthanc` (a real
Orthanc, with DICOMweb, authentication and restarts).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mercure import hookimpl
from mercure.config import Config, validate_config
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.store import State
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.testing_peers import PeerProcess as PeerProcess
from mercure.testing_peers import port_accepts as port_accepts
from mercure.testing_postgres import PostgresServer as PostgresServer
from mercure.testing_postgres import start_postgres
from mercure.testing_ssh import OpenSSHServer as OpenSSHServer
from mercure.testing_ssh import SSHAccount as SSHAccount
from mercure.testing_ssh import (
    create_ssh_account,
    delete_ssh_account,
    remove_base_folder,
    ssh_base_folder,
)
from mercure.testing_ssh import processes_containing as processes_containing

if TYPE_CHECKING:
    from mercure.jobs.store import JobRef
    from mercure.jobs.task import Task
    from mercure.services.dispatcher import Dispatcher
    from mercure.services.runtime import Runtime

DCMTK_BIN = Path(os.environ.get("MERCURE_DCMTK_BIN", "/usr/bin"))
ORTHANC_BIN = Path(os.environ.get("MERCURE_ORTHANC", "/usr/sbin/Orthanc"))
ORTHANC_DICOMWEB_PLUGIN = Path(
    os.environ.get("MERCURE_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def make_dataset(
    series_uid: str,
    study_uid: str,
    index: int,
    *,
    rows: int = 16,
    columns: int = 16,
    modality: str = "CT",
    series_description: str = "synthetic",
    sop_class: str = CTImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags: Any,
) -> Dataset:
    """One synthetic instance with pixel data (uncompressed, 16 bit)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Patient"
    ds.PatientID = "MRN0001"
    ds.AccessionNumber = "ACC0001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260101"
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SliceThickness = "1.0"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((index + i) % 251 for i in range(rows * columns * 2))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def make_series(
    folder: Path, count: int = 10, *, series_uid: str | None = None, **kwargs: Any
) -> list[Path]:
    """Write ``count`` instances of one new series into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = kwargs.pop("study_uid", None) or generate_uid()
    paths = []
    for i in range(count):
        ds = make_dataset(series_uid, study_uid, i, **kwargs)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta: what was sent."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


@dataclass
class DcmtkStoreSCP:
    """DCMTK's ``storescp`` writing received instances into ``folder``."""

    folder: Path
    port: int
    aet: str = "STORESCP"
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()

    def start(self) -> DcmtkStoreSCP:
        exe = DCMTK_BIN / "storescp"
        if not exe.exists():
            pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [
                str(exe),
                "-aet",
                self.aet,
                "-od",
                str(self.folder),
                "-uf",
                "+B",
                *self.extra_args,
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"storescp exited early: {err}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def dcmtk_storescu(
    files: list[Path] | Path,
    port: int,
    *,
    aec: str = "MERCURE",
    aet: str = "STORESCU",
    extra: tuple[str, ...] = (),
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Send files (or a folder, recursively) with DCMTK's ``storescu`` over one association."""
    exe = DCMTK_BIN / "storescu"
    if not exe.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    args = [str(exe), "-aet", aet, "-aec", aec, *extra]
    if isinstance(files, Path):
        args += ["+sd", "+r", "127.0.0.1", str(port), str(files)]
    else:
        args += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(
        args,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        check=check,
        timeout=timeout,
    )


def config_for(tmp_path: Path, **overrides: Any) -> Config:
    """A configuration whose spool folders are under ``tmp_path``, validated with built-ins."""
    data: dict[str, Any] = {
        f"{name}_folder": str(tmp_path / "spool" / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    data.update(
        port=0,
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        retry_delay=1,
        retry_max=3,
    )
    registry = overrides.pop("_registry", None) or build_plugin_manager(autoload=True).registry
    data.update(overrides)
    config, _ = validate_config(data, registry)
    return config


@pytest.fixture
def plugin_manager() -> PluginManager:
    """A fresh plugin manager with the built-in plugins only (no entry points)."""
    return build_plugin_manager(autoload=False)


@pytest.fixture
def register_plugin(plugin_manager: PluginManager) -> Iterator[Callable[..., str]]:
    """Register a plugin object on ``plugin_manager`` for this test only."""
    names: list[str] = []

    def register(plugin: object, name: str | None = None) -> str:
        registered = plugin_manager.register(plugin, name)
        names.append(registered)
        return registered

    yield register
    for name in names:
        if plugin_manager.pm.has_plugin(name):
            plugin_manager.unregister(name)


@pytest.fixture
def synthetic_series(tmp_path: Path) -> list[Path]:
    """Ten synthetic CT instances of one series."""
    return make_series(tmp_path / "series", 10)


@pytest.fixture
def mercure_config(tmp_path: Path) -> Config:
    """A configuration with its spool under ``tmp_path`` and one folder target ``folder``."""
    target = tmp_path / "target"
    target.mkdir()
    return config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
    )


@dataclass
class RunningRouter:
    """A router running in this process; ``port`` is its DICOM port."""

    config: Config
    supervisor: Any
    port: int

    def jobs(self, state: State = "success") -> int:
        """How many jobs are in ``state`` (``success``, ``error``, ``outgoing``, ...) now."""
        return sum(1 for _ in self.supervisor.runtime.store.list([state]))


@pytest.fixture
def running_router(mercure_config: Config) -> Iterator[RunningRouter]:
    """All services in this process with ``mercure_config``, on a free port."""
    yield from _run(mercure_config)


def _run(config: Config, plugins: PluginManager | None = None) -> Iterator[RunningRouter]:
    from mercure.services.runtime import build_runtime
    from mercure.services.supervisor import Supervisor

    manager = plugins or build_plugin_manager()
    supervisor = Supervisor(build_runtime(config, manager))
    supervisor.start()
    port = supervisor.receivers[0].port if supervisor.receivers else 0
    try:
        yield RunningRouter(config, supervisor, port)
    finally:
        supervisor.stop()


def start_router(config: Config, plugins: PluginManager | None = None) -> Iterator[RunningRouter]:
    """Generator form of ``running_router`` for custom configurations (use with ``yield from``
    or ``contextlib.contextmanager``); ``plugins``: a manager with test plugins registered."""
    yield from _run(config, plugins)


class EventRecorder:
    """An ``on_task_event`` observer that keeps every event.

    Register it on the manager given to :func:`start_router`:
    ``manager = build_plugin_manager(); manager.register(EventRecorder(), "events")``.
    """

    def __init__(self) -> None:
        self._events: list[TaskEvent] = []
        self._lock = threading.Lock()

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        with self._lock:
            self._events.append(event)

    def events(self, *types: TaskEventType) -> list[TaskEvent]:
        """The events so far, in order; only those of ``types`` if any are given."""
        with self._lock:
            return [e for e in self._events if not types or e.type in types]

    def wait(self, *types: TaskEventType, count: int = 1, timeout: float = 30.0) -> list[TaskEvent]:
        """Wait until at least ``count`` events of ``types`` were seen; return them all.

        Events follow the durable change they report, so a test that saw the change (a file,
        an outbox record) waits here for its event.
        """
        names = ", ".join(t.value for t in types) or "any"
        found: list[TaskEvent] = wait_for(
            lambda: (lambda seen: seen if len(seen) >= count else None)(self.events(*types)),
            timeout=timeout,
            what=f"{count} task event(s) of type {names}",
        )
        return found


def store_instances(
    files: Sequence[Path],
    port: int,
    *,
    aec: str = "MERCURE",
    aet: str = "STORESCU",
    host: str = "127.0.0.1",
) -> None:
    """Send DICOM files over one association with pynetdicom (no DCMTK needed).

    Fails the test if the association is refused or any instance is not stored with status
    Success, naming the file and the status.
    """
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=aet)
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    if len(contexts) > 128:
        pytest.fail(f"{len(contexts)} presentation contexts needed; an association has 128")
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=aec)
    if not assoc.is_established:
        pytest.fail(f"association with {aec} at {host}:{port} was not established")
    try:
        for path, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                shown = "no answer" if code is None else f"0x{code:04X}"
                pytest.fail(f"C-STORE of {path.name} to {host}:{port} ended with {shown}")
    finally:
        assoc.release()


def outbox_records(config: Config) -> list[dict[str, Any]]:
    """Every finished notification record (delivered or given up), in order of finishing."""
    from mercure.services.runtime import outbox_folder

    done = outbox_folder(config) / "done"
    records = []
    for path in done.glob("*/*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now; the next poll sees it
    return sorted(records, key=lambda r: float(r.get("finished_at", 0)))


def wait_for_notifications(
    config: Config, count: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Wait until the outbox has ``count`` finished records and nothing pending; return them."""
    from mercure.outbox import Outbox
    from mercure.services.runtime import outbox_folder

    outbox = Outbox(outbox_folder(config), fsync=False)

    def finished() -> list[dict[str, Any]] | None:
        records = outbox_records(config)
        return records if len(records) >= count and outbox.count() == 0 else None

    found: list[dict[str, Any]] = wait_for(
        finished, timeout=timeout, what=f"{count} finished notifications in the outbox"
    )
    return found


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    """DCMTK's storescp on a free port, storing into ``tmp_path / 'storescp'``."""
    scp = DcmtkStoreSCP(tmp_path / "storescp", free_port()).start()
    try:
        yield scp
    finally:
        scp.stop()


# -- Orthanc ----------------------------------------------------------------------------------


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


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc for one test (DICOMweb on when its plugin is installed); skips without."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc", dicomweb=ORTHANC_DICOMWEB_PLUGIN.exists()).start()
    try:
        yield server
    finally:
        server.stop()


class DispatchEnv:
    """A runtime and the core's Dispatcher over a spool in ``tmp_path``; jobs made by hand.

    Retries are due at once (``retry_delay`` 0) and each :meth:`deliver` is one synchronous
    delivery attempt, so a test follows a job try by try without waiting.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runtime: Runtime | None = None
        self.dispatcher: Dispatcher | None = None

    def start(self, targets: dict[str, Any], **overrides: Any) -> DispatchEnv:
        """(Re)build the runtime with these targets; jobs already in the spool stay."""
        from mercure.services.dispatcher import Dispatcher
        from mercure.services.runtime import build_runtime

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
        from mercure.jobs.task import Task, TaskDispatch, TaskInfo

        assert self.runtime is not None, "call start() first"
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
        """The job's current place (it moves between states)."""
        assert self.runtime is not None, "call start() first"
        found = self.runtime.store.find_exact(ref.id)
        assert found is not None, f"job {ref.id} vanished"
        return found

    def deliver(self, ref: JobRef) -> tuple[JobRef, Task]:
        """One delivery attempt; return the job's new place and its task file."""
        assert self.runtime is not None and self.dispatcher is not None, "call start() first"
        self.dispatcher.deliver(self.where(ref))
        current = self.where(ref)
        return current, self.runtime.store.read(current)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        if self.runtime is not None:
            self.runtime.close()  # the targets' close()
            self.runtime = None


@pytest.fixture
def dispatch_env(tmp_path: Path) -> Iterator[DispatchEnv]:
    """A :class:`DispatchEnv` over a spool in ``tmp_path``; call ``start(targets)`` first."""
    env = DispatchEnv(tmp_path)
    yield env
    env.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session; skips when PostgreSQL or psycopg is missing."""
    server = start_postgres(free_port())
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def ssh_account() -> Iterator[SSHAccount]:
    """A local user with a password, a key and a passphrase-protected key (needs root)."""
    base = ssh_base_folder()
    try:
        account = create_ssh_account(base)
    except BaseException:
        remove_base_folder(base)
        raise
    try:
        yield account
    finally:
        delete_ssh_account(account)
        remove_base_folder(base)


@pytest.fixture(scope="session")
def openssh_server(ssh_account: SSHAccount) -> Iterator[OpenSSHServer]:
    """OpenSSH's sshd on a free loopback port for ``ssh_account``, shared by the session.

    Tests that kill or re-key a server start an :class:`OpenSSHServer` of their own.
    """
    server = OpenSSHServer(ssh_account, ssh_account.home.parent / "sshd").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_known_hosts(openssh_server: OpenSSHServer, tmp_path: Path) -> Path:
    """A known_hosts file that trusts ``openssh_server`` and nothing else."""
    return openssh_server.write_known_hosts(tmp_path / "known_hosts")


@pytest.fixture
def ssh_destination(ssh_account: SSHAccount) -> Path:
    """A fresh, empty folder owned by ``ssh_account``: a target folder on the "server"."""
    return ssh_account.folder(f"dest-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def own_openssh_server(ssh_account: SSHAccount) -> Iterator[OpenSSHServer]:
    """An sshd for one test only, to kill, restart or re-key without disturbing others."""
    server = OpenSSHServer(ssh_account, ssh_account.home.parent / f"sshd-{uuid.uuid4().hex[:8]}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def folder_router(
    tmp_path: Path, *, manager: PluginManager | None = None, **overrides: Any
) -> Iterator[RunningRouter]:
    """A router on 127.0.0.1 whose rule ``all`` sends everything to the folder target ``folder``
    (``tmp_path / "target"``); ``overrides`` are configuration fields (``plugins={...}``),
    ``manager`` a plugin manager with test plugins registered."""
    target = tmp_path / "target"
    target.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("dicom_receiver", {"bind_address": "127.0.0.1"})
    if manager is not None:
        overrides.setdefault("_registry", manager.registry)
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        **overrides,
    )
    gen = start_router(config, manager)
    running = next(gen)
    try:
        yield running
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
