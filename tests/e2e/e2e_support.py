"""Helpers of the end-to-end tests: mercure as real processes, configurations, log reading.

Every process is started by the test, logs JSON lines into a file of its own, and is stopped
by its PID (SIGTERM for a clean stop, SIGKILL to simulate a crash).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from mercure.testing import free_port
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

HERE = Path(__file__).parent
SITE_PLUGINS = HERE / "site_plugins"
MERCURE_EXE = Path(sys.executable).parent / "mercure"
DCMTK_STORESCU = Path("/usr/bin/storescu")
DCMTK_ECHOSCU = Path("/usr/bin/echoscu")
SPOOL_NAMES = ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
STARTED_EVENT = "services started"


def mercure_exe() -> str:
    if MERCURE_EXE.exists():
        return str(MERCURE_EXE)
    found = shutil.which("mercure")
    if found is None:
        raise RuntimeError("the mercure command is not installed next to this Python")
    return found


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# -- configuration ---------------------------------------------------------------------------


def spool_config(root: Path, **overrides: Any) -> dict[str, Any]:
    """A ``mercure.json`` whose spool folders are under ``root/spool``, on a free port."""
    data: dict[str, Any] = {f"{name}_folder": str(root / "spool" / name) for name in SPOOL_NAMES}
    data.update(
        port=free_port(),
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        cleaner_scan_interval=1,
        retry_delay=1,
        retry_max=5,
    )
    data["dicom_receiver"] = {"bind_address": "127.0.0.1"}
    data.update(overrides)
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def folder_of(config: dict[str, Any], name: str) -> Path:
    return Path(config[f"{name}_folder"])


# -- processes -------------------------------------------------------------------------------


@dataclass
class MercureProcess:
    """One ``mercure`` process; all its output goes to ``log_path`` (appended across restarts)."""

    args: list[str]
    log_path: Path
    cwd: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _offset: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> MercureProcess:
        """Start the process and wait until it logged that its services started."""
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self._offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [mercure_exe(), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=self.cwd,
            env=self.env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mercure {' '.join(self.args)} exited with {self.proc.returncode} "
                    f"while starting:\n{self.output()}"
                )
            if STARTED_EVENT in self.output(since_start=True):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mercure {' '.join(self.args)} did not start within {timeout} s:\n"
                    f"{self.output()}"
                )
            time.sleep(0.05)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; return the exit code (a hang past ``timeout`` is killed)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(
                    f"mercure {' '.join(self.args)} ignored SIGTERM for {timeout} s"
                ) from None
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL (a crash): no handler runs, no file is closed cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self, since_start: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                if since_start:
                    fh.seek(self._offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (lines that are not JSON are skipped)."""
        return log_events(self.log_path)


@dataclass
class ProcessFactory:
    """Creates :class:`MercureProcess` objects for one test and remembers them for cleanup."""

    root: Path
    started: list[MercureProcess]

    def make(self, name: str, *args: str) -> MercureProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("MERCURE_CONFIG", "MERCURE_DATA")}
        env.update(MERCURE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        proc = MercureProcess(list(args), self.root / f"{name}.log", self.root, env)
        self.started.append(proc)
        return proc

    def start(self, name: str, *args: str) -> MercureProcess:
        return self.make(name, *args).start()


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short ``mercure`` command and return its result (not checked)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MERCURE_CONFIG", "MERCURE_DATA")}
    env["MERCURE_LOG_FORMAT"] = "json"
    return subprocess.run(
        [mercure_exe(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def log_events(path: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                events.append(record)
    return events


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it is truthy; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_deadline(condition: Callable[[], Any], deadline: float, what: str) -> Any:
    """Like :func:`wait_until` with an absolute ``time.monotonic()`` deadline."""
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"deadline passed while waiting for {what}")
        time.sleep(0.05)


# -- folders ---------------------------------------------------------------------------------


def visible_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` that are not hidden (dot) names."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def all_files(root: Path) -> set[Path]:
    """Every regular file under ``root`` (recursively)."""
    return {p for p in root.rglob("*") if p.is_file()}


def target_instances(target: Path) -> dict[str, list[str]]:
    """``<target>/<task id>/<name>.dcm`` as {instance file name: [task ids holding it]}."""
    found: dict[str, list[str]] = {}
    for task_dir in visible_entries(target):
        if not task_dir.is_dir():
            continue
        for f in task_dir.iterdir():
            if f.is_file() and f.name.endswith(".dcm") and not f.name.startswith("."):
                found.setdefault(f.name, []).append(task_dir.name)
    return found


def read_task(job_folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((job_folder / "task.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- crafted DICOM ---------------------------------------------------------------------------


def raw_dicom_file(
    path: Path, sop_class: str, sop_uid: str, transfer_syntax: str, body: bytes
) -> Path:
    """A DICOM file with valid file meta and ``body`` (any bytes) as its dataset.

    Sent with pynetdicom's chunked mode, ``body`` goes over the wire exactly as written.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


@contextlib.contextmanager
def started_processes(root: Path) -> Iterator[ProcessFactory]:
    """A process factory whose processes still running at the end are killed by their PID."""
    started: list[MercureProcess] = []
    factory = ProcessFactory(root, started)
    try:
        yield factory
    finally:
        for proc in started:
            proc.kill()
            proc.close()


def storescu(files: list[Path], port: int, calling_ae: str = "STORESCU") -> None:
    """Send ``files`` on one association with DCMTK's storescu (called AE ``MERCURE``)."""
    if not DCMTK_STORESCU.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    sent = subprocess.run(
        [str(DCMTK_STORESCU), "-aet", calling_ae, "-aec", "MERCURE", "127.0.0.1", str(port),
         *map(str, files)],
        env=dcmtk_env(), capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr.decode()


EVENT_OBSERVER = """
import json
from mercure import hookimpl
from mercure.metrics_hub import metrics_for_event

@hookimpl
def on_task_event(event):
    record = {"type": str(event.type), "task_id": event.task_id, "series_uid": event.series_uid,
              "target": event.target, "info": event.info, "rule": event.rule,
              "extra": event.extra,
              "metrics": [[m.name, m.kind, m.service, m.value, m.tags]
                          for m in metrics_for_event(event)]}
    with open(%r, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\\n")
"""


def event_observer(tmp_path: Path) -> tuple[Path, Path]:
    """A site plugin folder whose observer writes every task event (with the metrics it
    makes) to a JSON-lines file; returns the folder and the file."""
    folder = tmp_path / "site"
    folder.mkdir()
    events = tmp_path / "events.jsonl"
    (folder / "event_recorder.py").write_text(EVENT_OBSERVER % str(events))
    return folder, events


def read_events(path: Path) -> list[dict[str, Any]]:
    """The records an :func:`event_observer` wrote so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def jobs(folder: Path) -> dict[str, dict[str, Any]]:
    """The jobs in a state folder with their task files, by id."""
    return {j.name: t for j in visible_entries(folder)
            if j.is_dir() and (t := read_task(j)) is not None}  # fmt: skip
