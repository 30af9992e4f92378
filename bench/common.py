"""Shared pieces of the benchmarks: synthetic series, DCMTK peers, a router in a subprocess.

Every benchmark measures its reference (DCMTK's own tools, or the same code at a small size)
in the same run and prints ratios, because these machines are noisy; absolute times are
printed for information only.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DCMTK = Path("/usr/bin")
MERCURE = Path(sys.executable).parent / "mercure"
#: The router runs with the receive journal (opt-in, see mercure.jobs.journal) unless the
#: environment says otherwise.
ENV = {"MERCURE_RECEIVE_JOURNAL": "1", **os.environ, "TCP_NODELAY": "1"}


def require_dcmtk() -> None:
    if not (DCMTK / "storescp").exists():
        sys.exit("DCMTK is needed: apt-get install dcmtk")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def make_ct_series(folder: Path, count: int, size: int = 512, series: int = 1) -> list[Path]:
    """``series`` series of ``count`` 16-bit ``size``² CT instances (0.5 MB each at 512)."""
    from mercure.testing import make_series

    files: list[Path] = []
    for i in range(series):
        files += make_series(folder / f"s{i}", count, rows=size, columns=size)
    return files


class StoreSCP:
    """DCMTK storescp writing into a folder; counts what arrived.

    storescp serves one association at a time; with ``parallel`` it forks a process per
    association (``--fork``), so that parallel senders are not queued one behind the other.
    """

    def __init__(self, folder: Path, *, parallel: bool = False) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(DCMTK / "storescp"),
                *(["--fork"] if parallel else []),
                "-aet",
                "STORESCP",
                "-od",
                str(folder),
                "-uf",
                str(self.port),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    def count(self) -> int:
        with os.scandir(self.folder) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))

    def last_mtime(self) -> float:
        with os.scandir(self.folder) as entries:
            return max(
                (e.stat().st_mtime for e in entries if not e.name.startswith(".")), default=0
            )

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until ``count`` instances arrived; return the time the last one was written."""
        deadline = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.count()} of {count} instances arrived")
            time.sleep(0.01)
        return self.last_mtime()

    def clear(self) -> None:
        for entry in self.folder.iterdir():
            entry.unlink()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def storescu(files: list[Path], port: int, aec: str = "ANY") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(DCMTK / "storescu"), "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def route_all_to(scp: StoreSCP) -> dict[str, Any]:
    """Configuration keys: one ``dicom`` target that is ``scp``, one rule routing everything."""
    return {
        "targets": {
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(scp.port),
                "aet_target": "STORESCP",
            }
        },
        "rules": {"all": {"rule": "True", "target": "pacs", "action": "route"}},
    }


def spool_config(base: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        f"{name}_folder": str(base / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    config.update(
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        retry_delay=5,
        retry_max=3,
        cleaner_scan_interval=3600,
    )
    config.update(overrides)
    return config


@contextmanager
def router(
    config: dict[str, Any], base: Path, only: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``mercure run`` with ``config`` in a subprocess; its log goes to ``base/router.log``."""
    path = base / "mercure.json"
    path.write_text(json.dumps(config, indent=2))
    args = [str(MERCURE), "run", "--config", str(path)]
    profile = os.environ.get("MERCURE_BENCH_PROFILE")
    if profile:  # e.g. MERCURE_BENCH_PROFILE=/tmp/router.txt: py-spy raw stacks of the router
        py_spy = Path(sys.executable).parent / "py-spy"
        args = [
            str(py_spy),
            "record",
            "-o",
            profile,
            "-f",
            "raw",
            "-r",
            "200",
            "--threads",
            "--gil",
            "--subprocesses",
            "--",
            *args,
        ]
    if only:
        args += ["--only", only]
    with open(base / "router.log", "wb") as log:
        proc = subprocess.Popen(
            args, env={**ENV, "MERCURE_LOG_FORMAT": "json"}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            if only is None or "receiver" in only:
                wait_port(int(config["port"]), proc)
            yield proc
        finally:
            stop_router(proc, profiled=bool(profile))
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop_router(proc: subprocess.Popen[bytes], profiled: bool) -> None:
    """SIGTERM the router; under py-spy, the router itself, so py-spy writes its profile."""
    if profiled:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        for pid in pids:
            os.kill(int(pid), signal.SIGTERM)
        if pids:
            return
    proc.terminate()


@contextmanager
def workdir(name: str) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix=f"mercure-bench-{name}-"))
    try:
        yield base
    finally:
        if not os.environ.get("MERCURE_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


def settle_disk() -> None:
    """Flush dirty pages so one measurement does not pay for the previous one's writes."""
    os.sync()
    time.sleep(0.5)


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures and append them as one JSON line to bench/results/<name>.jsonl."""
    record = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record))


# -- references of the throughput bench ---------------------------------------------------


def durable_floor(folder: Path, count: int, size: int, group: int = 0) -> float:
    """Seconds to write ``count`` instances of ``size`` bytes durably on this disk.

    ``group`` = 0: what a durable receiver does per instance (write a temporary file,
    ``fdatasync``, rename, ``fsync`` the folder). ``group`` = N: group commit, appending every
    instance to one file with one ``fdatasync`` per N instances (and one at the end).
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    settle_disk()
    start = time.perf_counter()
    if group <= 0:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(count):
                tmp, final = folder / f".{i}.tmp", folder / f"{i}.dcm"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, payload)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, final)
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        fd = os.open(folder / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for i in range(count):
                os.write(fd, payload)
                if (i + 1) % group == 0:
                    os.fdatasync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def journal_floor(folder: Path, count: int, size: int) -> float:
    """Seconds for the receiver's own journal to make ``count`` instances durable.

    The time until the last ``store`` returned (each returns once its record is written and
    ``fdatasync``-ed, when the receiver may answer); moving them into the spool happens in the
    background and is not counted.
    """
    from mercure.jobs.incoming import IncomingSpool
    from mercure.jobs.journal import ReceiveJournal

    spool = IncomingSpool(folder / "incoming")
    journal = ReceiveJournal(spool)
    journal.open()
    payload = os.urandom(size)
    settle_disk()
    start = time.perf_counter()
    for i in range(count):
        journal.store("1.2.3", f"1.2.3.{i}", [payload], {"Modality": "CT"})
    elapsed = time.perf_counter() - start
    journal.close()
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed


ORTHANC_FORWARD_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'target')
end
"""


@contextmanager
def orthanc_forwarding_to(scp: StoreSCP, base: Path) -> Iterator[int]:
    """Debian's Orthanc forwarding every stored instance to ``scp``; yields its DICOM port."""
    from mercure.testing_orthanc import ORTHANC_BIN, Orthanc

    if not ORTHANC_BIN.exists():
        raise RuntimeError("Orthanc is needed: apt-get install orthanc")
    script = base / "forward.lua"
    script.write_text(ORTHANC_FORWARD_LUA)
    server = Orthanc(
        base / "orthanc",
        extra={
            "LuaScripts": [str(script)],
            "DicomModalities": {"target": ["STORESCP", "127.0.0.1", scp.port]},
            "StorageCompression": False,
        },
    ).start()
    try:
        yield server.dicom_port
    finally:
        server.stop()
