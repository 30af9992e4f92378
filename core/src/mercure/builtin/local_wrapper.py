"""The supervisor process of one ``local`` runner run; started by the runner, standard library only.

It runs as ``python -I -S local_wrapper.py RUN_FOLDER`` in a session of its own, so that a
processor stopped with Ctrl-C, SIGTERM or SIGKILL leaves the module running, and records the
module's exit status in ``RUN_FOLDER/exit.json`` where any later processor finds it: that file
is what lets a restarted processor re-attach to the run instead of starting it again.

Files in ``RUN_FOLDER`` (the runner writes ``spec.json`` and ``cancel``; the wrapper the rest):

``spec.json``   the command, environment, working folder and grace times
``lock``        held (``flock``) by the wrapper as long as it lives: free means it ended
``begun.json``  written before the module starts (then with its process id): a run that has
                begun is never started again, even if its wrapper died
``module.log``  the module's standard output and error
``cancel``      asks the wrapper to stop the module: SIGTERM to its process group, SIGKILL
                after ``kill_grace`` seconds
``exit.json``   the outcome: ``exit_code`` (128 + N when killed by signal N), ``signal``,
                ``cancelled``, ``error`` (could not start), ``finished_at``

The module runs in a process group of its own and dies with the wrapper (``PDEATHSIG``). The
wrapper is a child subreaper: processes the module leaves behind (daemons, forgotten
children, also those that left its process group) become the wrapper's children, and are
killed when the module's main process has exited, so no run leaves a process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.1


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False  # not Linux: the process group is all that is cleaned up


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (temporary name, fsync, rename) write ``data`` to ``path``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def descendants(root: int) -> set[int]:
    """Process ids below ``root`` in the process tree (read from /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2 and fields[0] != "Z":  # a zombie is reaped, not killed
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def reap() -> None:
    """Collect every child that exited (orphans reparented to this subreaper included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_leftovers(pgid: int, grace: float) -> None:
    """Stop every process the module left: SIGTERM, ``grace`` seconds, then SIGKILL."""
    me = os.getpid()
    for sig, pause in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        if sig == signal.SIGTERM and grace <= 0:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for pid in descendants(me):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and descendants(me):
            reap()
            time.sleep(POLL)
    for _ in range(100):  # processes forked while we were killing: until none is left
        reap()
        left = descendants(me)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    reap()


def main(folder: Path) -> int:
    lock_fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another wrapper runs this module (a launch repeated after a crash)
    exit_file = folder / "exit.json"
    begun_file = folder / "begun.json"
    if exit_file.exists():
        return 0
    if begun_file.exists():
        # A wrapper started this run and died: never start the module a second time.
        earlier = json.loads(begun_file.read_text(encoding="utf-8"))
        if isinstance(earlier.get("pgid"), int):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(earlier["pgid"], signal.SIGKILL)
        write_json(
            exit_file,
            {
                "exit_code": None,
                "signal": None,
                "cancelled": False,
                "error": "the process that watched the module died while the module ran; "
                "its exit status is unknown",
                "finished_at": time.time(),
            },
        )
        return 0
    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    begun: dict[str, Any] = {
        "wrapper_pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.time(),
    }
    write_json(begun_file, begun)

    def child_setup() -> None:
        os.setpgid(0, 0)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    log = open(folder / spec.get("log", "module.log"), "ab")  # noqa: SIM115 - kept for the run
    try:
        proc = subprocess.Popen(
            spec["argv"],
            env=spec["env"],
            cwd=spec["cwd"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=child_setup,  # this process has one thread
            close_fds=True,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        write_json(
            exit_file,
            {
                "exit_code": None,
                "signal": None,
                "cancelled": False,
                "error": f"cannot start {spec['argv'][0]!r}: {reason}",
                "finished_at": time.time(),
            },
        )
        return 0
    finally:
        log.close()
    begun.update(module_pid=proc.pid, pgid=proc.pid)
    write_json(begun_file, begun)

    kill_grace = float(spec.get("kill_grace", 10.0))
    cancelled_at: float | None = None
    killed = False
    while True:
        try:
            returncode = proc.wait(timeout=POLL)
            break
        except subprocess.TimeoutExpired:
            pass
        if cancelled_at is None and (stop_requested or (folder / "cancel").exists()):
            cancelled_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        elif (
            cancelled_at is not None
            and not killed
            and time.monotonic() - cancelled_at >= kill_grace
        ):
            killed = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    leftover_grace = 0.0 if cancelled_at is not None else float(spec.get("leftover_grace", 2.0))
    kill_leftovers(proc.pid, leftover_grace)
    sig_name = None
    exit_code = returncode
    if returncode < 0:
        sig_name = signal.Signals(-returncode).name
        exit_code = 128 - returncode
    write_json(
        exit_file,
        {
            "exit_code": exit_code,
            "signal": sig_name,
            "cancelled": cancelled_at is not None,
            "error": None,
            "finished_at": time.time(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
