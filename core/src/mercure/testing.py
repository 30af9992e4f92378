"""Pytest fixtures and helpers for testing mercure and its plugins (entry point ``pytest11``).

Fixtures:

* ``plugin_manager`` - a fresh :class:`~mercure.plugins.PluginManager` with the built-ins only.
* ``register_plugin`` - register a plugin object on that manager for one test.
* ``synthetic_series`` - a folder of small synthetic CT instances (one series).
* ``mercure_config`` - a :class:`~mercure.config.Config` whose spool lives in ``tmp_path``.
* ``running_router`` - all services of a router in this process, on a free port.
* ``router_for`` - ``router_for(config)`` starts a router with ``config`` and returns it with
  an :class:`EventRecorder` of its task events (``RouterFactory``).
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

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mercure.config import Config
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.testing_dicom import DCMTK_BIN as DCMTK_BIN
from mercure.testing_dicom import DcmtkStoreSCP as DcmtkStoreSCP
from mercure.testing_dicom import dataset_bytes as dataset_bytes
from mercure.testing_dicom import dcmtk_storescu as dcmtk_storescu
from mercure.testing_dicom import make_dataset as make_dataset
from mercure.testing_dicom import make_series as make_series
from mercure.testing_dicom import store_instances as store_instances
from mercure.testing_orthanc import ORTHANC_BIN as ORTHANC_BIN
from mercure.testing_orthanc import ORTHANC_DICOMWEB_PLUGIN as ORTHANC_DICOMWEB_PLUGIN
from mercure.testing_orthanc import Orthanc as Orthanc
from mercure.testing_orthanc import require_orthanc as require_orthanc
from mercure.testing_peers import PeerProcess as PeerProcess
from mercure.testing_peers import free_port as free_port
from mercure.testing_peers import port_accepts as port_accepts
from mercure.testing_peers import wait_for as wait_for
from mercure.testing_postgres import PostgresServer as PostgresServer
from mercure.testing_postgres import start_postgres
from mercure.testing_router import DispatchEnv as DispatchEnv
from mercure.testing_router import EventRecorder as EventRecorder
from mercure.testing_router import RunningRouter as RunningRouter
from mercure.testing_router import _run
from mercure.testing_router import config_for as config_for
from mercure.testing_router import folder_router as folder_router
from mercure.testing_router import outbox_records as outbox_records
from mercure.testing_router import start_router as start_router
from mercure.testing_router import wait_for_notifications as wait_for_notifications
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
    pass


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


@pytest.fixture
def running_router(mercure_config: Config) -> Iterator[RunningRouter]:
    """All services in this process with ``mercure_config``, on a free port."""
    yield from _run(mercure_config)


RouterFactory = Callable[[Config], tuple[RunningRouter, EventRecorder]]


@pytest.fixture
def router_for() -> Iterator[RouterFactory]:
    """``router_for(config)``: all services of a router with ``config`` and an
    :class:`EventRecorder` of its task events; stopped after the test."""
    stack = contextlib.ExitStack()

    def start(config: Config) -> tuple[RunningRouter, EventRecorder]:
        recorder = EventRecorder()
        manager = build_plugin_manager()
        manager.register(recorder, "event-recorder")
        generator = start_router(config, manager)
        router = next(generator)
        stack.callback(generator.close)
        return router, recorder

    with stack:
        yield start


@pytest.fixture
def dcmtk_storescp(tmp_path: Path) -> Iterator[DcmtkStoreSCP]:
    """DCMTK's storescp on a free port, storing into ``tmp_path / 'storescp'``."""
    scp = DcmtkStoreSCP(tmp_path / "storescp", free_port()).start()
    try:
        yield scp
    finally:
        scp.stop()


# -- Orthanc ----------------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc for one test (DICOMweb on when its plugin is installed); skips without."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc", dicomweb=ORTHANC_DICOMWEB_PLUGIN.exists()).start()
    try:
        yield server
    finally:
        server.stop()


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
