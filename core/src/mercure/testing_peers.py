"""Real servers for tests (InfluxDB, carbon, Prometheus, ...): started, checked, stopped by PID.

Re-exported by :mod:`mercure.testing`; plugins import them from there.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


@dataclass
class PeerProcess:
    """A real server (InfluxDB, carbon, Prometheus, ...) started for tests, stopped by its PID.

    ``ready`` is polled every 50 ms after the start; an early exit or a server that is not
    ready in time fails with the end of its output (written to ``log_path``), so a broken
    peer says why. :meth:`stop` and :meth:`start` again restart it with the same arguments.
    """

    name: str
    args: Sequence[str]
    ready: Callable[[], bool]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 60.0) -> PeerProcess:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(self.args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"{self.name} exited with code {code}:\n{self.output()}")
            try:
                if self.ready():
                    return self
            except Exception:  # not ready yet: a refused connection, a 503, ...
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate (then kill, after ``timeout``) and wait; nothing of it is left running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the server wrote."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


__all__ = ["PeerProcess", "port_accepts"]


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
