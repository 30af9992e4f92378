"""Helpers of the docker runner's tests (imported by the tests and the fixtures)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from mercure.testing import free_port


@dataclass(frozen=True)
class DockerEngine:
    url: str
    folder: Path
    pid: int

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=60)


# -- mercure as real processes -----------------------------------------------------------------

SPOOL_NAMES = ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
STARTED_EVENT = "services started"


def spool_config(root: Path, **overrides: Any) -> dict[str, Any]:
    """A ``mercure.json`` with its spool under ``root/spool``, receiving on a free port."""
    data: dict[str, Any] = {f"{name}_folder": str(root / "spool" / name) for name in SPOOL_NAMES}
    data.update(
        port=free_port(),
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        cleaner_scan_interval=1,
        retry_delay=1,
        retry_max=3,
        dicom_receiver={"bind_address": "127.0.0.1"},
    )
    data.update(overrides)
    return data


@dataclass
class MercureProcess:
    """``mercure run ...`` as a process of its own, its output appended to ``log_path``."""

    args: list[str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    def start(self, timeout: float = 60.0) -> MercureProcess:
        exe = Path(sys.executable).parent / "mercure"
        env = {k: v for k, v in os.environ.items() if k not in ("MERCURE_CONFIG", "MERCURE_DATA")}
        env.update(MERCURE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.cwd,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while STARTED_EVENT not in self.output(since_start=True):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mercure {' '.join(self.args)} did not start:\n{self.output()}")
            time.sleep(0.05)
        return self

    def output(self, since_start: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                if since_start:
                    fh.seek(self._offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: no handler runs (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def mercure_processes(root: Path) -> Iterator[Callable[..., MercureProcess]]:
    """Start ``mercure`` processes; those still running at the end are killed by their PID."""
    started: list[MercureProcess] = []

    def start(name: str, *args: str) -> MercureProcess:
        proc = MercureProcess(list(args), root / f"{name}.log", root)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def jobs_in(folder: Path) -> dict[str, dict[str, Any]]:
    """The jobs of a spool folder with their task files, by id."""
    if not folder.is_dir():
        return {}
    found = {}
    for job in sorted(folder.iterdir()):
        task = read_json(job / "task.json") if not job.name.startswith(".") else None
        if isinstance(task, dict):
            found[job.name] = task
    return found
