"""Extra DICOM receiver processes that share the port, so parallel associations use every core.

pynetdicom handles each association in a thread of one process, and Python runs one thread at
a time; with ``dicom_receiver.processes`` > 1 the supervisor starts that many receivers, each
its own process, all bound to the port with ``SO_REUSEPORT`` so that the kernel spreads new
associations over them. They write into the same incoming spool, whose writes are atomic
across processes. A worker that dies is started again.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from mercure.config import Config, validate_config
from mercure.jobs.incoming import IncomingSpool
from mercure.logs import configure_logging, get_logger

log = get_logger("mercure.receiver")
READY = "ready\n"
START_TIMEOUT = 30.0


def _worker(config_data: dict[str, Any], port: int, fsync: bool, index: int = 1) -> None:
    """Body of one extra receiver process (started with ``spawn``: no inherited threads)."""
    from mercure.builtin.dicom_receiver import dicom_receiver_for
    from mercure.plugins import build_plugin_manager

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    plugins = build_plugin_manager()
    if config_data.get("plugin_folder"):
        plugins.load_site_plugins(Path(config_data["plugin_folder"]))
    config, _ = validate_config(config_data, plugins.registry, "(receiver process)")
    configure_logging(config.log_level)
    receiver = dicom_receiver_for(config, IncomingSpool(config.folder("incoming"), fsync=fsync))
    receiver.reuse_port = True
    receiver.journal_owner = f"worker-{index}"  # its own receive journal, recovered at start
    receiver.start()
    sys.stdout.write(READY)
    sys.stdout.flush()
    # Nobody reads the pipe after this line: anything else written to it must not block.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    stop.wait()
    receiver.stop()


class ReceiverPool:
    """``count`` receiver processes on ``port``, restarted when they die."""

    def __init__(self, config: Config, port: int, count: int, *, fsync: bool = True) -> None:
        data = config.model_dump(mode="json")
        data["port"] = port
        data["dicom_receiver"]["tls"] = None  # the TLS port stays with the main process
        data["dicom_receiver"]["processes"] = 1
        self.request = {"config": data, "port": port, "fsync": fsync}
        self.port = port
        self.count = count
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        # A fresh interpreter (no inherited threads or locks); the configuration goes over stdin
        # so that no secret shows in the process list.
        process = subprocess.Popen(
            [sys.executable, "-m", "mercure.services.receiver_pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({**self.request, "index": index}).encode())
        process.stdin.close()
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if ready else b""
        if line.decode() != READY:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"a receiver process did not start within {START_TIMEOUT:g} s "
                f"(exit code {process.returncode}); see its log lines above"
            )
        process.stdout.close()
        return process

    def start(self) -> None:
        self.processes = [self._spawn(i + 1) for i in range(self.count)]
        log.info(
            "receiver processes started",
            count=self.count,
            port=self.port,
            pids=[p.pid for p in self.processes],
        )

    def check(self) -> None:
        """Start again every worker that died."""
        for i, process in enumerate(self.processes):
            if process.poll() is not None:
                log.warning(
                    "receiver process died; starting it again",
                    pid=process.pid,
                    exitcode=process.returncode,
                )
                self.processes[i] = self._spawn(i + 1)

    def stop(self, timeout: float = 10.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


if __name__ == "__main__":
    request = json.loads(sys.stdin.buffer.read())
    _worker(request["config"], int(request["port"]), bool(request["fsync"]), int(request["index"]))
