"""A real PostgreSQL server for tests: Debian's, started on a free loopback port.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user, with
a data folder that user owns outside pytest's ``tmp_path`` (which root owns); as another user
it runs as that user. The server is stopped by its data folder (``pg_ctl stop``) and the
folder removed. Tests can stop and start it again to play an outage.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's ``bin`` folder, or None."""
    env = os.environ.get("MERCURE_POSTGRES_BIN")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


@dataclass
class PostgresServer:
    """One PostgreSQL cluster: ``start()``, ``stop()``, ``url(database)``, ``create_database``."""

    bindir: Path
    base: Path
    port: int
    user: str | None = None  # the system user that runs it (None: this process's user)
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["group"] = pwd.getpwnam(self.user).pw_gid
            kwargs["extra_groups"] = []
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.base,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def init(self) -> PostgresServer:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write("\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        if self.user is not None:
            os.chown(self.data / "postgresql.conf", pwd.getpwnam(self.user).pw_uid, -1)
        return self

    def start(self) -> PostgresServer:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base}"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not get ready on port {self.port}: {self.log()}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                check=False,
            )  # fmt: skip

    def log(self) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(port: int) -> PostgresServer:
    """Initialise and start a cluster in a fresh folder; skips the test if it cannot be had."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server is not installed (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'mercure-core[postgres]')")
    user = None
    base = Path(tempfile.mkdtemp(prefix="mercure-pg-", dir="/var/tmp"))
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        user = "postgres"
        os.chown(base, entry.pw_uid, entry.pw_gid)
        os.chmod(base, 0o700)
    server = PostgresServer(bindir, base, port, user)
    try:
        server.init().start()
    except BaseException:
        log = server.log()
        with contextlib.suppress(Exception):
            server.remove()
        raise RuntimeError(f"could not start PostgreSQL: {log}") from None
    return server


__all__ = ["PostgresServer", "postgres_bin", "start_postgres"]
