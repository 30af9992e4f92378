"""Fault-injection scenarios: the router under kills, a vanished target and a full disk.

One module holds the three scenarios, so that the CI tests (``tests/chaos/test_chaos.py``, a
reduced size) and the full-size run (``python bench/chaos.py``) execute exactly the same code
with different :class:`Params`. Each scenario returns a :class:`Report`: the numbers worth
quoting (instances sent, delivered, delivered more than once, kills, refusals) and the list of
``problems`` found by the final accounting (empty when nothing was lost).

The pieces:

* mercure runs as separate ``mercure run --only receiver|router|dispatcher|cleaner`` processes
  (started, killed and restarted by PID, see ``tests/e2e/e2e_support.py``);
* the sender is DCMTK's ``/usr/bin/storescu -v -nh``, one association per series; its verbose
  output says which instance got which C-STORE response, so an instance counts as
  *acknowledged* only when storescu printed a Success (or Warning) response for it. Like a
  modality, the sender sends again whatever was not acknowledged (the association was aborted,
  refused, or the instance got a failure status);
* the target is DCMTK's ``/usr/bin/storescp +uf +B``: bit-preserving, and with unique file
  names, so an instance received twice is two files and duplicates can be counted. Each file is
  identified by the SOP Instance UID in its meta header and compared with the dataset that was
  sent (:func:`mercure.testing.dataset_bytes`, pixel data included).

The final accounting (:func:`account`) checks that every instance sent is at the target as an
exact copy, that nothing else is there (a file cut short is allowed only where the scenario
killed the target itself), that every instance a task file records as delivered is at the
target, and that nothing is left in ``incoming/``, ``outgoing/`` or ``error/``. Copies beyond
the first are counted and reported, never failed: delivery is at-least-once by design (a
dispatcher killed after the peer stored an instance but before the task file recorded it sends
that instance again).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
E2E = HERE.parent / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

from e2e_support import (  # noqa: E402
    DCMTK_ECHOSCU,
    DCMTK_STORESCU,
    MercureProcess,
    ProcessFactory,
    dcmtk_env,
    folder_of,
    log_events,
    spool_config,
    started_processes,
    visible_entries,
    write_config,
)
from mercure.testing import dataset_bytes, free_port, make_series  # noqa: E402
from pydicom.filereader import read_file_meta_info  # noqa: E402

DCMTK_STORESCP = Path("/usr/bin/storescp")
MOUNT = Path("/usr/bin/mount")
UMOUNT = Path("/usr/bin/umount")
SEED_VARIABLE = "MERCURE_CHAOS_SEED"
ROUTER_AET = "MERCURE"
TARGET_AET = "CHAOS-TARGET"
SENDER_AET = "CHAOS-SCU"
SERVICES = ("receiver", "router", "dispatcher")


# -- parameters and results ------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """The size of a scenario run (CI and full size differ only here)."""

    series: int = 10
    instances: int = 30  # per series
    size: int = 128  # rows = columns; 16 bit, so 32 KiB of pixel data at 128
    kills: int = 8
    outages: int = 1
    outage_seconds: float = 3.0
    flow_seconds: float = 20.0  # how long the sender spreads the series over (kills too)
    tmpfs_size: str = "4m"
    timeout: float = 110.0  # seconds for the whole scenario; past it, it fails

    @property
    def total(self) -> int:
        return self.series * self.instances


#: The sizes the tests run in CI.
CI_SIZE = {
    "kills": Params(series=10, instances=30, kills=8, flow_seconds=20.0),
    "target-down": Params(series=10, instances=30, outages=1, outage_seconds=3.0),
    "disk-full": Params(series=6, instances=40),
}
#: The full sizes (``python bench/chaos.py``).
FULL_SIZE = {
    "kills": Params(series=40, instances=50, kills=20, flow_seconds=60.0, timeout=600.0),
    "target-down": Params(series=20, instances=50, outages=3, outage_seconds=6.0, timeout=300.0),
    "disk-full": Params(series=20, instances=50, timeout=600.0),
}


@dataclass
class Report:
    """What a scenario observed; ``problems`` lists every broken promise (empty = passed)."""

    scenario: str
    seed: int
    sent: int = 0
    c_stores: int = 0
    resent: int = 0
    failed_associations: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    copies: int = 0
    duplicated: int = 0
    duplicated_in_one_job: int = 0
    duplicated_across_jobs: int = 0
    duplicated_unattributed: int = 0  # its job's task file is gone (cleaned)
    series_routed_twice: int = 0
    jobs: int = 0
    partial_files: int = 0
    retries_logged: int = 0
    kills: list[str] = field(default_factory=list)
    victims: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"chaos scenario {self.scenario!r} (seed {self.seed}; replay: "
            f"{SEED_VARIABLE}={self.seed}), {self.seconds:.0f} s:",
            f"  instances sent {self.sent}: {self.c_stores} C-STOREs by storescu, "
            f"{self.resent} instances sent again after a failed association or a refusal, "
            f"{self.failed_associations} storescu runs failed",
        ]
        if self.refused:
            lines.append(
                "  refused by the receiver: "
                + ", ".join(f"{n} x {status}" for status, n in sorted(self.refused.items()))
            )
        lines.append(
            f"  delivered {self.delivered} of {self.sent} ({self.copies} files at the target); "
            f"delivered more than once: {self.duplicated} instances "
            f"({self.duplicated_in_one_job} re-sent within one job, "
            f"{self.duplicated_across_jobs} in several jobs"
            + (
                f", {self.duplicated_unattributed} whose job was cleaned already"
                if self.duplicated_unattributed
                else ""
            )
            + "); "
            f"jobs delivered {self.jobs}, series routed as more than one job "
            f"{self.series_routed_twice}"
        )
        if self.partial_files:
            lines.append(
                f"  files cut short at the target when it was killed: {self.partial_files}"
            )
        if self.kills:
            lines.append(
                f"  kills {len(self.kills)}: "
                + ", ".join(f"{name} {n}" for name, n in sorted(self.victims.items()))
            )
        if self.retries_logged:
            lines.append(f"  delivery retries logged by the dispatcher: {self.retries_logged}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(
            "  result: "
            + ("nothing lost" if not self.problems else f"{len(self.problems)} PROBLEM(S)")
        )
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)

    def kill_log(self) -> str:
        return "\n".join(f"  {k}" for k in self.kills) or "  (no kills)"


class ScenarioSkipped(Exception):
    """The scenario cannot run on this machine (the reason says why)."""


def seed_from_env() -> int:
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else random.SystemRandom().randrange(2**32)


# -- the sender: storescu, and what it says was acknowledged ---------------------------------

SENDING = re.compile(r"Sending file: (.+?)\s*$")
RESPONSE = re.compile(r"Received Store Response \((.*)\)\s*$")


@dataclass
class StorescuRun:
    returncode: int
    attempted: list[str]  # paths storescu started to send, in order
    statuses: dict[str, str]  # path -> the C-STORE response text storescu printed
    output: str

    @property
    def acknowledged(self) -> set[str]:
        return {p for p, s in self.statuses.items() if s.startswith(("Success", "Warning"))}

    def refused(self) -> dict[str, str]:
        return {p: s for p, s in self.statuses.items() if not s.startswith(("Success", "Warning"))}


def storescu(files: list[Path], port: int, timeout: float = 90.0) -> StorescuRun:
    """Send ``files`` over one association with DCMTK's storescu; read back every response."""
    args = [
        str(DCMTK_STORESCU),
        "-v",
        "-nh",  # go on after a failure status: every instance gets its own answer
        "-aet",
        SENDER_AET,
        "-aec",
        ROUTER_AET,
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "30",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    try:
        done = subprocess.run(
            args,
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        output, code = done.stdout.decode(errors="replace"), done.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        output = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        code = -1
    attempted: list[str] = []
    statuses: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        if m := SENDING.search(line):
            current = m.group(1)
            attempted.append(current)
        elif (m := RESPONSE.search(line)) and current is not None:
            statuses[current] = m.group(1)
            current = None
    return StorescuRun(code, attempted, statuses, output)


class Sender(threading.Thread):
    """Sends each series with storescu, again and again until every instance is acknowledged.

    ``gate(i)`` is called before series ``i`` is first sent (the fault driver uses it to spread
    the series over its schedule). A series that was not fully acknowledged is sent again after
    a short pause, only the instances still unacknowledged, as a modality would.
    """

    def __init__(
        self,
        series: list[list[Path]],
        port: int,
        rng: random.Random,
        deadline: float,
        gate: Callable[[int], None] | None = None,
        gap: tuple[float, float] = (0.1, 0.4),
    ) -> None:
        super().__init__(name="chaos-sender", daemon=True)
        self.series = series
        self.port = port
        self.rng = rng
        self.deadline = deadline
        self.gate = gate
        self.gap = gap
        self.acknowledged: set[str] = set()
        self.attempts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.failed_runs = 0
        self.series_done = 0
        self.in_association = threading.Event()
        self.done = threading.Event()
        self.errors: list[str] = []
        self.last_failure = ""

    def run(self) -> None:
        try:
            for i, files in enumerate(self.series):
                if self.gate is not None:
                    self.gate(i)
                self.send_until_acknowledged(files)
                self.series_done = i + 1
                time.sleep(self.rng.uniform(*self.gap))
        except Exception as exc:  # reported by the scenario
            self.errors.append(repr(exc))
        finally:
            self.done.set()

    def send_until_acknowledged(self, files: list[Path]) -> None:
        pending = [f for f in files if str(f) not in self.acknowledged]
        while pending:
            if time.monotonic() > self.deadline:
                self.errors.append(
                    f"{len(pending)} instances still not acknowledged at the deadline; "
                    f"last storescu failure:\n{self.last_failure[-2000:]}"
                )
                return
            self.in_association.set()
            try:
                run = storescu(pending, self.port)
            finally:
                self.in_association.clear()
            self.attempts.update(run.attempted)
            self.acknowledged |= run.acknowledged
            for status in run.refused().values():
                self.refusals[status] += 1
            if run.returncode != 0:
                self.failed_runs += 1
                self.last_failure = run.output
            pending = [f for f in pending if str(f) not in self.acknowledged]
            if pending:
                time.sleep(self.rng.uniform(0.2, 0.6))


# -- the target: DCMTK storescp with unique file names ---------------------------------------


class TargetSCP:
    """``storescp +uf +B`` on a fixed port, so that it can be stopped and started again there."""

    def __init__(self, folder: Path, port: int, log_path: Path) -> None:
        self.folder = folder
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 20.0) -> TargetSCP:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(DCMTK_STORESCP),
                    "-aet",
                    TARGET_AET,
                    "-od",
                    str(self.folder),
                    "+uf",  # every reception is a file of its own: duplicates stay countable
                    "+B",  # written exactly as received
                    "-dhl",
                    str(self.port),
                ],
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"storescp exited with {self.proc.returncode} while starting; "
                    f"see {self.log_path}"
                )
            echo = subprocess.run(
                [str(DCMTK_ECHOSCU), "-aec", TARGET_AET, "-to", "5", "127.0.0.1", str(self.port)],
                env=dcmtk_env(),
                capture_output=True,
                timeout=30,
                check=False,
            )
            if echo.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not answer C-ECHO within {timeout} s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class Copy:
    sop_uid: str
    complete: bool


class TargetScan:
    """What is at the target: per file, the instance it holds and whether it is exact.

    Exact files are remembered, so polling rescans only new files and files still being
    written.
    """

    def __init__(self, folder: Path, originals: dict[str, Path]) -> None:
        self.folder = folder
        self.originals = originals  # SOP Instance UID -> the file that was sent
        self._digest: dict[str, tuple[int, str]] = {}
        self.files: dict[str, Copy] = {}
        self.strangers: dict[str, str] = {}  # file name -> why it matches nothing sent

    def _original(self, sop: str) -> tuple[int, str]:
        if sop not in self._digest:
            body = dataset_bytes(self.originals[sop])
            self._digest[sop] = (len(body), hashlib.sha256(body).hexdigest())
        return self._digest[sop]

    def refresh(self) -> TargetScan:
        with os.scandir(self.folder) as entries:
            names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]
        for name in names:
            known = self.files.get(name)
            if known is not None and known.complete:
                continue
            self._classify(self.folder / name)
        return self

    def _classify(self, path: Path) -> None:
        name = path.name
        try:
            sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
            body = dataset_bytes(path)
        except Exception:
            # A header cut short: nothing of an instance is identifiable yet.
            self.files[name] = Copy("", False)
            return
        if sop not in self.originals:
            self.strangers[name] = f"holds SOP Instance UID {sop}, which was never sent"
            self.files[name] = Copy(sop, False)
            return
        length, digest = self._original(sop)
        if len(body) == length and hashlib.sha256(body).hexdigest() == digest:
            self.files[name] = Copy(sop, True)
            self.strangers.pop(name, None)
            return
        if len(body) < length and dataset_bytes(self.originals[sop]).startswith(body):
            self.files[name] = Copy(sop, False)  # cut short (or still being written)
            return
        self.strangers[name] = f"holds {sop} with bytes that differ from those sent"
        self.files[name] = Copy(sop, False)

    def complete(self) -> Counter[str]:
        return Counter(c.sop_uid for c in self.files.values() if c.complete)

    def partial(self) -> list[str]:
        return sorted(
            n for n, c in self.files.items() if not c.complete and n not in self.strangers
        )


# -- mercure processes and the spool ---------------------------------------------------------


class Router:
    """The mercure services of one scenario, each in its own process."""

    def __init__(self, root: Path, config: dict[str, Any], factory: ProcessFactory) -> None:
        self.root = root
        self.config = config
        self.config_path = write_config(root / "mercure.json", config)
        self.factory = factory
        self.procs: dict[str, MercureProcess] = {}

    @property
    def port(self) -> int:
        return int(self.config["port"])

    def start(self, *names: str) -> None:
        for name in names:
            self.procs[name] = self.factory.start(
                name, "run", "--config", str(self.config_path), "--only", name
            )

    def folder(self, name: str) -> Path:
        return folder_of(self.config, name)

    def stop(self) -> list[str]:
        """SIGTERM every service; the names of those that did not exit cleanly."""
        unclean = []
        for name, proc in self.procs.items():
            try:
                if proc.terminate() != 0:
                    unclean.append(name)
            except RuntimeError:
                unclean.append(name)
        return unclean

    def kill_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()

    def errors_logged(self, limit: int = 20) -> list[str]:
        """Errors the services logged (refusals for want of space excepted), for diagnosis."""
        found = []
        for name, proc in self.procs.items():
            for event in proc.events():
                if str(event.get("event", "")).startswith("cannot store instance"):
                    continue
                if event.get("level") in ("error", "critical", "exception"):
                    found.append(f"{name}: {event.get('event')} {_brief(event)}")
        return found[:limit]

    def logged(self, service: str, event: str) -> list[dict[str, Any]]:
        proc = self.procs.get(service)
        if proc is None:
            return []
        return [e for e in log_events(proc.log_path) if e.get("event") == event]

    def retries_logged(self) -> int:
        return len(self.logged("dispatcher", "delivery failed; will retry"))

    # -- spool state -------------------------------------------------------------------------

    def incoming_busy(self) -> bool:
        incoming = self.folder("incoming")
        return bool(visible_entries(incoming)) or bool(_listdir(incoming / ".routing"))

    def outgoing_busy(self) -> bool:
        return bool(_listdir(self.folder("outgoing")))

    def routing_or_streaming(self) -> bool:
        """A router has work: series arriving (streamed into open jobs), taken, or jobs built."""
        incoming = self.folder("incoming")
        return (
            bool(visible_entries(incoming))
            or bool(_listdir(incoming / ".routing"))
            or any(n.startswith(".new-") for n in _listdir(self.folder("outgoing")))
        )

    def spool_state(self) -> str:
        incoming = self.folder("incoming")
        return (
            f"incoming {len(visible_entries(incoming))} "
            f"routing {len(_listdir(incoming / '.routing'))} "
            f"outgoing {len(_listdir(self.folder('outgoing')))} "
            f"success {len(visible_entries(self.folder('success')))} "
            f"error {len(visible_entries(self.folder('error')))}"
        )


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _brief(event: dict[str, Any]) -> str:
    keep = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp", "logger")}
    text = json.dumps(keep, default=str)
    return text if len(text) < 600 else text[:600] + "..."


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def router_config(root: Path, target_port: int, **overrides: Any) -> dict[str, Any]:
    return spool_config(
        root,
        retry_delay=1,
        retry_delay_max=2,
        retry_max=1000,
        targets={
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(target_port),
                "aet_target": TARGET_AET,
                "aet_source": ROUTER_AET,
                "timeout": 20,
            }
        },
        rules={"all": {"rule": "True", "target": "pacs"}},
        **overrides,
    )


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``folder``; :class:`ScenarioSkipped` if this machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise ScenarioSkipped("mounting a tmpfs needs root (run as root, as .ci/run does)")
    mounted = subprocess.run(
        [str(MOUNT), "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise ScenarioSkipped(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        unmounted = subprocess.run([str(UMOUNT), str(folder)], check=False, timeout=60)
        if unmounted.returncode != 0:  # still busy: detach it rather than leave it mounted
            subprocess.run([str(UMOUNT), "-l", str(folder)], check=True, timeout=60)


def fill(path: Path) -> int:
    """Write ``path`` until its filesystem is full; return the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
    finally:
        os.close(fd)


# -- the accounting --------------------------------------------------------------------------


def make_input(root: Path, params: Params) -> tuple[list[list[Path]], dict[str, Path]]:
    """The series to send, and SOP Instance UID -> file."""
    series = [
        make_series(
            root / "series" / f"s{i:03d}", params.instances, rows=params.size, columns=params.size
        )
        for i in range(params.series)
    ]
    originals = {p.name.removesuffix(".dcm"): p for files in series for p in files}
    return series, originals


def task_files(router: Router) -> list[tuple[str, str, dict[str, Any]]]:
    """(state, job id, task.json) of every job left in the spool."""
    found = []
    for state in ("outgoing", "success", "error", "discard"):
        for job in visible_entries(router.folder(state)):
            try:
                data = json.loads((job / "task.json").read_bytes())
            except (OSError, ValueError):
                continue
            found.append((state, job.name, data))
    return found


def settled(router: Router, scan: TargetScan, expected: set[str]) -> bool:
    return (
        not router.incoming_busy()
        and not router.outgoing_busy()
        and expected <= set(scan.refresh().complete())
    )


def wait_settled(
    router: Router, scan: TargetScan, expected: set[str], deadline: float, report: Report
) -> None:
    while not settled(router, scan, expected):
        if time.monotonic() > deadline:
            missing = expected - set(scan.complete())
            report.problems.append(
                f"not settled by the deadline: {len(missing)} of {len(expected)} instances "
                f"not at the target; spool: {router.spool_state()}; outgoing: "
                f"{_listdir(router.folder('outgoing'))[:10]}"
            )
            return
        time.sleep(0.25)


def account(
    report: Report,
    router: Router,
    scan: TargetScan,
    sender_acknowledged: set[str],
    *,
    partial_allowed: bool,
    receiver_killed: bool = False,
) -> None:
    """The final accounting: nothing lost, nothing invented, duplicates counted."""
    scan.refresh()
    originals = scan.originals
    complete = scan.complete()
    report.sent = len(originals)
    report.copies = len(scan.files)
    report.delivered = len(set(complete) & set(originals))
    not_acknowledged = set(originals) - sender_acknowledged
    if not_acknowledged:
        report.problems.append(
            f"{len(not_acknowledged)} instances were never acknowledged by the receiver, "
            f"e.g. {sorted(not_acknowledged)[:3]}"
        )
    missing = set(originals) - set(complete)
    if missing:
        report.problems.append(
            f"{len(missing)} instances are not at the target as an exact copy, "
            f"e.g. {sorted(missing)[:3]}"
        )
    for name, why in sorted(scan.strangers.items())[:10]:
        report.problems.append(f"target file {name} {why}")
    partial = scan.partial()
    report.partial_files = len(partial)
    if partial and not partial_allowed:
        report.problems.append(
            f"{len(partial)} files at the target are cut short although the target was never "
            f"killed: {partial[:5]}"
        )
    duplicated = {sop: n for sop, n in complete.items() if n > 1}
    report.duplicated = len(duplicated)

    tasks = task_files(router)
    jobs_of: dict[str, list[str]] = {}
    # The jobs made of each series: from the task files left, and from the router's log (the
    # cleaner may have removed delivered jobs already).
    series_jobs: dict[str, set[str]] = {}
    for event in router.logged("router", "series routed"):
        for job in event.get("jobs") or []:
            series_jobs.setdefault(str(event.get("series_uid")), set()).add(str(job).split("/")[-1])
    delivered_jobs = {str(e.get("task_id")) for e in router.logged("dispatcher", "job delivered")}
    for state, job_id, task in tasks:
        dispatch = task.get("dispatch") or {}
        if state == "success":
            series_jobs.setdefault(str(dispatch.get("series_uid")), set()).add(job_id)
            delivered_jobs.add(job_id)
        for names in (dispatch.get("delivered") or {}).values():
            for name in names:
                sop = name.removesuffix(".dcm")
                jobs_of.setdefault(sop, []).append(job_id)
                if complete.get(sop, 0) == 0:
                    report.problems.append(
                        f"task file of {state}/{job_id} records {name} as delivered, "
                        "but the target has no exact copy of it"
                    )
    report.jobs = len(delivered_jobs)
    report.series_routed_twice = sum(1 for jobs in series_jobs.values() if len(jobs) > 1)
    for sop in duplicated:
        recorded_by = len(set(jobs_of.get(sop, [])))
        if recorded_by > 1:
            report.duplicated_across_jobs += 1
        elif recorded_by == 1:
            report.duplicated_in_one_job += 1
        else:
            report.duplicated_unattributed += 1
    for state in ("outgoing", "error"):
        left = _listdir(router.folder(state))
        if left:
            report.problems.append(f"{state}/ is not empty: {sorted(left)[:5]}")
    incoming = router.folder("incoming")
    if visible_entries(incoming) or _listdir(incoming / ".routing"):
        report.problems.append(f"series left in incoming/: {router.spool_state()}")
    leftovers = _listdir(incoming / ".tmp")
    if leftovers and receiver_killed:
        report.notes.append(
            f"{len(leftovers)} temporary files in incoming/.tmp, left by killed receivers "
            "(the cleaner removes them after an hour)"
        )
    elif leftovers:
        report.problems.append(
            f"temporary files left in incoming/.tmp by receivers never killed: {leftovers[:5]}"
        )
    report.retries_logged = router.retries_logged()


# -- scenario 1: kill -9 of receiver, router and dispatcher ----------------------------------


@dataclass
class Kill:
    at: float
    victim: str
    pid: int
    aimed: str
    pause: float
    spool: str
    new_pid: int = 0

    def __str__(self) -> str:
        return (
            f"t={self.at:6.2f}s kill -9 {self.victim:<10} pid {self.pid:<7} ({self.aimed}; "
            f"{self.spool}) restarted after {self.pause:.2f}s as pid {self.new_pid}"
        )


def run_kills(root: Path, params: Params, seed: int, out: Callable[[str], None] = print) -> Report:
    """Instances flow through three separate services while random ones are SIGKILLed."""
    report = Report("kills", seed)
    rng = random.Random(seed)
    out(
        f"chaos kills: seed {seed} (replay: {SEED_VARIABLE}={seed}); {params.total} instances "
        f"in {params.series} series, {params.kills} kills"
    )
    t0 = time.monotonic()
    deadline = t0 + params.timeout
    series, originals = make_input(root, params)
    target = TargetSCP(root / "target", free_port(), root / "storescp.log").start()
    try:
        with started_processes(root) as factory:
            router = Router(root, router_config(root, target.port), factory)
            # The cleaner is not a victim: it removes what killed builders leave behind.
            router.start("receiver", "router", "dispatcher", "cleaner")
            # The series are spread over the flow, the kills over the same stretch of time.
            gap = params.flow_seconds / params.series
            sender = Sender(
                series,
                router.port,
                random.Random(rng.getrandbits(32)),
                deadline,
                gap=(0.5 * gap, 1.5 * gap),
            )
            moments = sorted(rng.uniform(0.0, params.flow_seconds) for _ in range(params.kills))
            start = time.monotonic()
            sender.start()
            try:
                for moment in moments:
                    if time.monotonic() > deadline:
                        report.problems.append("the deadline passed before every kill was made")
                        break
                    time.sleep(max(0.0, start + moment - time.monotonic()))
                    victim = rng.choice(SERVICES)
                    aimed = "random moment"
                    if rng.random() < 0.6:
                        # Aim: wait (a bounded time) until the victim is in the middle of its work.
                        busy = {
                            "receiver": sender.in_association.is_set,
                            "router": router.routing_or_streaming,
                            "dispatcher": router.outgoing_busy,
                        }[victim]
                        limit = time.monotonic() + 2 * gap
                        while not busy() and time.monotonic() < limit:
                            time.sleep(0.002)
                        time.sleep(rng.uniform(0.005, 0.06))
                        aimed = "aimed, busy" if busy() else "aimed, idle"
                    proc = router.procs[victim]
                    kill = Kill(
                        time.monotonic() - t0,
                        victim,
                        proc.pid,
                        aimed,
                        rng.uniform(0.0, 0.5),
                        router.spool_state(),
                    )
                    proc.kill()
                    time.sleep(kill.pause)
                    proc.start()
                    kill.new_pid = proc.pid
                    report.kills.append(str(kill))
                    report.victims[victim] += 1
                    out(f"  {kill}")
                sender.join(max(0.0, deadline - time.monotonic()))
                if not sender.done.is_set():
                    report.problems.append("the sender did not finish by the deadline")
                report.problems.extend(f"sender: {e}" for e in sender.errors)
                acknowledged = {Path(p).name.removesuffix(".dcm") for p in sender.acknowledged}
                scan = TargetScan(target.folder, originals)
                wait_settled(router, scan, acknowledged, deadline, report)
                _sender_stats(report, sender)
                account(
                    report,
                    router,
                    scan,
                    acknowledged,
                    partial_allowed=False,
                    receiver_killed=report.victims["receiver"] > 0,
                )
                unclean = router.stop()
                if unclean:
                    report.problems.append(f"did not stop cleanly on SIGTERM: {unclean}")
            finally:
                sender.deadline = 0.0  # a sender still running gives up at its next round
                if report.problems:
                    report.notes.extend(router.errors_logged())
    finally:
        target.kill()
    report.seconds = time.monotonic() - t0
    return report


def _sender_stats(report: Report, sender: Sender) -> None:
    report.c_stores = sum(sender.attempts.values())
    report.resent = sum(1 for n in sender.attempts.values() if n > 1)
    report.failed_associations = sender.failed_runs
    report.refused.update(sender.refusals)


# -- scenario 2: the target goes away for a while --------------------------------------------


def run_target_down(
    root: Path, params: Params, seed: int, out: Callable[[str], None] = print
) -> Report:
    """The target (storescp) is killed mid-flow, stays away a few seconds, and comes back."""
    report = Report("target-down", seed)
    rng = random.Random(seed)
    out(
        f"chaos target-down: seed {seed}; {params.total} instances in {params.series} series, "
        f"{params.outages} outage(s) of {params.outage_seconds:g} s"
    )
    t0 = time.monotonic()
    deadline = t0 + params.timeout
    series, originals = make_input(root, params)
    target = TargetSCP(root / "target", free_port(), root / "storescp.log").start()
    marks = [(j + 1) * params.series // (params.outages + 1) for j in range(params.outages)]
    try:
        with started_processes(root) as factory:
            router = Router(root, router_config(root, target.port), factory)
            router.start("receiver", "router", "dispatcher", "cleaner")
            outages_started = 0
            lock = threading.Condition()

            def gate(i: int) -> None:
                # The series after a mark are sent only once that outage began: some jobs are
                # sure to meet the target away.
                wanted = sum(1 for m in marks if i >= m)
                with lock:
                    lock.wait_for(lambda: outages_started >= wanted, timeout=30)

            sender = Sender(series, router.port, random.Random(rng.getrandbits(32)), deadline, gate)
            sender.start()
            try:
                for mark in marks:
                    while sender.series_done < mark and not sender.done.is_set():
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
                    time.sleep(rng.uniform(0.0, 0.3))
                    at = time.monotonic() - t0
                    delivered = len(TargetScan(target.folder, originals).refresh().complete())
                    target.kill()
                    with lock:
                        outages_started += 1
                        lock.notify_all()
                    time.sleep(params.outage_seconds)
                    target.start()
                    line = (
                        f"t={at:6.2f}s target killed after series {mark} "
                        f"({delivered} instances delivered so far), back after "
                        f"{params.outage_seconds:g} s"
                    )
                    report.kills.append(line)
                    report.victims["target (storescp)"] += 1
                    out(f"  {line}")
                sender.join(max(0.0, deadline - time.monotonic()))
                if not sender.done.is_set():
                    report.problems.append("the sender did not finish by the deadline")
                report.problems.extend(f"sender: {e}" for e in sender.errors)
                acknowledged = {Path(p).name.removesuffix(".dcm") for p in sender.acknowledged}
                scan = TargetScan(target.folder, originals)
                wait_settled(router, scan, acknowledged, deadline, report)
                _sender_stats(report, sender)
                account(report, router, scan, acknowledged, partial_allowed=True)
                if report.retries_logged == 0:
                    report.problems.append(
                        "the dispatcher logged no failed delivery: the outage hit no job"
                    )
                unclean = router.stop()
                if unclean:
                    report.problems.append(f"did not stop cleanly on SIGTERM: {unclean}")
            finally:
                sender.deadline = 0.0
                if report.problems:
                    report.notes.extend(router.errors_logged())
    finally:
        target.kill()
    report.seconds = time.monotonic() - t0
    return report


# -- scenario 3: the spool's disk is full ----------------------------------------------------


def run_disk_full(
    root: Path, params: Params, seed: int, out: Callable[[str], None] = print
) -> Report:
    """The whole spool on a small tmpfs: more is sent than fits while the target is away.

    Round 1 sends every series while the target is down, so nothing can leave the spool and it
    fills: the receiver must answer what it cannot keep with a failure status and keep what it
    acknowledged. Then the target comes back, the dispatcher delivers, the cleaner (retention 0)
    removes delivered jobs, space returns, and the refused instances, sent again, are accepted
    and delivered.
    """
    report = Report("disk-full", seed)
    rng = random.Random(seed)
    out(
        f"chaos disk-full: seed {seed}; {params.total} instances in {params.series} series "
        f"into a spool of {params.tmpfs_size}"
    )
    t0 = time.monotonic()
    deadline = t0 + params.timeout
    series, originals = make_input(root, params)
    with tmpfs(root / "spool", params.tmpfs_size):
        target = TargetSCP(root / "target", free_port(), root / "storescp.log")
        try:
            with started_processes(root) as factory:
                config = router_config(root, target.port, retention=0, cleaner_scan_interval=1)
                router = Router(root, config, factory)
                router.start("receiver", "router", "dispatcher", "cleaner")
                acknowledged: set[str] = set()
                attempts: Counter[str] = Counter()

                def send_round(number: int) -> int:
                    refused = 0
                    for files in series:
                        pending = [f for f in files if str(f) not in acknowledged]
                        if not pending:
                            continue
                        run = storescu(pending, router.port)
                        attempts.update(run.attempted)
                        acknowledged.update(run.acknowledged)
                        for status in run.refused().values():
                            report.refused[status] += 1
                        refused += len(run.refused())
                        unanswered = set(map(str, pending)) - set(run.statuses)
                        if unanswered:
                            report.problems.append(
                                f"round {number}: {len(unanswered)} instances got no C-STORE "
                                f"response (storescu exit {run.returncode}):\n"
                                f"{run.output[-1500:]}"
                            )
                            report.failed_associations += 1
                    out(
                        f"  round {number}: {len(acknowledged)} of {len(originals)} "
                        f"acknowledged so far, {refused} refused in this round; "
                        f"spool: {router.spool_state()}"
                    )
                    return refused

                refused_first = send_round(1)
                first = {Path(p).name.removesuffix(".dcm") for p in acknowledged}
                if refused_first == 0:
                    report.problems.append(
                        "the spool never filled: raise the number of instances or shrink the tmpfs"
                    )
                # Take whatever space is left, as another program might: from now on the disk
                # is full to the last byte, and only jobs delivered and cleaned make room.
                filled = fill(root / "spool" / ".filler")
                report.notes.append(
                    f"after round 1 the last {filled // 1024} KiB of the spool were filled"
                )
                # Everything acknowledged so far must survive the full disk and be delivered.
                target.start()
                scan = TargetScan(target.folder, originals)
                while not first <= set(scan.refresh().complete()):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.25)
                lost = first - set(scan.complete())
                if lost:
                    report.problems.append(
                        f"{len(lost)} instances acknowledged while the disk was full did not "
                        f"reach the target, e.g. {sorted(lost)[:3]}"
                    )
                number = 1
                while len(acknowledged) < len(originals) and time.monotonic() < deadline:
                    time.sleep(rng.uniform(0.5, 1.5))  # the cleaner frees space meanwhile
                    number += 1
                    send_round(number)
                report.notes.append(
                    f"{number} rounds of sending; {len(first)} instances acknowledged in round 1 "
                    "while the target was away"
                )
                sop_acknowledged = {Path(p).name.removesuffix(".dcm") for p in acknowledged}
                wait_settled(router, scan, sop_acknowledged, deadline, report)
                report.c_stores = sum(attempts.values())
                report.resent = sum(1 for n in attempts.values() if n > 1)
                account(report, router, scan, sop_acknowledged, partial_allowed=False)
                other = {
                    s: n for s, n in report.refused.items() if "outofresources" not in _squash(s)
                }
                if other:
                    report.problems.append(f"refusals other than 'Out of Resources': {other}")
                unclean = router.stop()
                if unclean:
                    report.problems.append(f"did not stop cleanly on SIGTERM: {unclean}")
                if report.problems:
                    report.notes.extend(router.errors_logged())
        finally:
            target.kill()
    report.seconds = time.monotonic() - t0
    return report


SCENARIOS: dict[str, Callable[[Path, Params, int, Callable[[str], None]], Report]] = {
    "kills": run_kills,
    "target-down": run_target_down,
    "disk-full": run_disk_full,
}
