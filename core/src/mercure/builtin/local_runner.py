"""The built-in ``local`` runner: a processing module is a command run as a subprocess.

No container engine is needed: the module's ``command`` (a command line, a list of
arguments, or a Python entry point ``package.module:function``) runs with mercure's folder
environment (``MERCURE_IN_DIR``, ``MERCURE_OUT_DIR`` and the MONAI/Holoscan aliases), as the
router's own user, without network or file-system isolation. It is the runner when
``process_runner`` is empty.

Each run is watched by a small supervisor process (:mod:`mercure.builtin.local_wrapper`) in a
session of its own, which records the exit status in the run's folder. The handle names that
folder, so a processor restarted while a module runs re-attaches to it; the module is never
started twice for one ``run_id``. Cancelling (the processor's timeout) sends SIGTERM to the
module's process group and SIGKILL ``kill_grace`` seconds later; whatever the module started
is killed with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mercure import hookimpl
from mercure.builtin import local_wrapper
from mercure.fsutil import atomic_write_bytes, remove_tree
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn
from mercure.runners import ProcessingRun, Runner, RunnerError, RunOutcome, folder_environment

if TYPE_CHECKING:
    from mercure.config import Module

WRAPPER = Path(local_wrapper.__file__).resolve()
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
PYTHON_PLACEHOLDER = "{python}"
START_TIMEOUT = 30.0
POLL = 0.05
ESCALATE_AFTER = 5.0
"""Seconds past ``kill_grace`` after which a repeated cancel kills the module itself."""

DEFAULT_PASS_ENVIRONMENT = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
]


class LocalRunnerSettings(PluginSettings):
    """Settings of a ``local`` runner instance (``plugins.runners.local``)."""

    pass_environment: list[str] = Field(default_factory=lambda: list(DEFAULT_PASS_ENVIRONMENT))
    """Variables of the router's own environment a module gets (nothing else leaks to it:
    the router's environment may hold secrets)."""
    environment: dict[str, str] = {}
    """Variables every module run by this runner gets (a module's own ``environment`` wins)."""
    kill_grace: float = Field(default=10.0, ge=0)
    """Seconds between SIGTERM and SIGKILL when a run is cancelled."""
    max_log_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """The end of a module's log that is handed back (the whole log stays in its file)."""


def module_command(module: Module) -> list[str]:
    """The argument list of a module's ``command``; ``ValueError`` says what is wrong."""
    raw = module.command
    if isinstance(raw, str):
        if not raw.strip():
            raise ValueError("no command: the local runner needs one")
        try:
            argv = shlex.split(raw)
        except ValueError as exc:
            raise ValueError(f"cannot be split into arguments: {exc}") from None
        if len(argv) == 1 and ENTRY_POINT.match(argv[0]):
            target, func = argv[0].split(":")
            code = (
                "import sys, importlib\n"
                f"fn = importlib.import_module({target!r})\n"
                f"for part in {func!r}.split('.'): fn = getattr(fn, part)\n"
                "result = fn()\n"
                "sys.exit(result if isinstance(result, int) else 0)\n"
            )
            return [sys.executable, "-c", code]
    else:
        argv = [str(a) for a in raw]
        if not argv or not argv[0]:
            raise ValueError("no command: the local runner needs one")
    if argv[0] == PYTHON_PLACEHOLDER:
        argv[0] = sys.executable
    return argv


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text = f"[... {size - limit} earlier bytes in {path} ...]\n" + text.split("\n", 1)[-1]
    return text


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class LocalRunner(Runner[LocalRunnerSettings]):
    """Runs modules as local commands; see the module docstring."""

    def __init__(self, name: str, settings: LocalRunnerSettings, context: Any) -> None:
        super().__init__(name, settings, context)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    @classmethod
    def check_module(
        cls, settings: LocalRunnerSettings | None, name: str, module: Module
    ) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        try:
            module_command(module)
        except ValueError as exc:
            hint = (
                f"; module '{name}' has a docker_tag: set process_runner to \"docker\" and "
                "install mercure-runner-docker to run it as a container"
                if module.docker_tag
                else ""
            )
            errors.append(("command", f"{exc}{hint}"))
        if module.requires_root and os.geteuid() != 0:
            errors.append(
                (
                    "requires_root",
                    "the local runner runs modules as the router's own user, which is not root",
                )
            )
        return errors

    # -- the contract ---------------------------------------------------------------------

    def launch(self, run: ProcessingRun) -> str:
        try:
            argv = module_command(run.module)
        except ValueError as exc:
            raise RunnerError(f"module '{run.module_name}': command: {exc}") from None
        folder = run.run_folder or run.output_folder.parent / "local-run"
        folder.mkdir(parents=True, exist_ok=True)
        handle = json.dumps({"folder": str(folder.resolve()), "host": socket.gethostname()})
        if (folder / "begun.json").exists() or (folder / "exit.json").exists():
            return handle  # launched before this call (the processor restarted): re-attach
        env = {k: os.environ[k] for k in self.settings.pass_environment if k in os.environ}
        env.update(self.settings.environment)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(run.environment)
        env.update(folder_environment(str(run.input_folder), str(run.output_folder)))
        if run.persistence_folder is not None:
            run.persistence_folder.mkdir(parents=True, exist_ok=True)
            env["MODULE_PERSISTENCE_DIR"] = str(run.persistence_folder)
        spec = {
            "argv": argv,
            "env": env,
            "cwd": str(folder),
            "kill_grace": self.settings.kill_grace,
            "log": "module.log",
        }
        atomic_write_bytes(folder / "spec.json", json.dumps(spec).encode("utf-8"))
        with open(folder / "wrapper.log", "ab") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(WRAPPER), str(folder)],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise RunnerError(f"cannot start the local runner's wrapper: {exc}") from exc
        with self._lock:
            self._children[handle] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while not ((folder / "begun.json").exists() or (folder / "exit.json").exists()):
            if proc.poll() is not None:
                break  # a wrapper that exited at once: another one runs it, or it failed
            if time.monotonic() > deadline:
                break  # slow machine: wait() follows it
            time.sleep(POLL)
        if proc.poll() not in (None, 0):
            problem = _tail(folder / "wrapper.log", 2000).strip()
            raise RunnerError(
                f"the local runner's wrapper for module '{run.module_name}' failed: {problem}"
            )
        return handle

    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        folder = self._folder(handle)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            outcome = self._outcome(folder)
            if outcome is not None:
                self._reap(handle)
                return outcome
            if not self._wrapper_alive(folder):
                outcome = self._outcome(folder)  # it may have finished just now
                if outcome is not None:
                    self._reap(handle)
                    return outcome
                if self._just_launched(handle):
                    pass  # still starting up
                else:
                    self._reap(handle)
                    return RunOutcome(
                        exit_code=None,
                        log=_tail(folder / "module.log", self.settings.max_log_bytes),
                        error="the local runner's wrapper process ended without recording the "
                        f"module's exit status (see {folder / 'wrapper.log'})",
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(POLL * 2, remaining))

    def cancel(self, handle: str) -> None:
        folder = self._folder(handle)
        marker = folder / "cancel"
        if not marker.exists():
            with contextlib.suppress(FileNotFoundError):
                atomic_write_bytes(marker, str(time.time()).encode())
            return
        # Asked before: if the wrapper did not stop the module in time, do it from here.
        try:
            asked = float(marker.read_text() or 0)
        except (OSError, ValueError):
            asked = 0.0
        if time.time() - asked < self.settings.kill_grace + ESCALATE_AFTER:
            return
        info = json.loads(handle)
        if info.get("host") != socket.gethostname():
            return  # the wrapper on that host acts on the marker; nothing to signal from here
        begun = _read_json(folder / "begun.json") or {}
        for key, kill in (("pgid", os.killpg), ("wrapper_pid", os.kill)):
            pid = begun.get(key)
            if isinstance(pid, int) and pid > 1:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)

    def cleanup(self, handle: str) -> None:
        folder = self._folder(handle)
        self._reap(handle)
        if self._wrapper_alive(folder):
            return  # still running: never remove what a live run uses
        remove_tree(folder)

    def close(self) -> None:
        # Running modules keep running (a later processor re-attaches); only forget them.
        with self._lock:
            for proc in self._children.values():
                proc.poll()
            self._children.clear()

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _folder(handle: str) -> Path:
        try:
            info = json.loads(handle)
            return Path(info["folder"])
        except (ValueError, KeyError, TypeError):
            raise RunnerError(f"not a handle of the local runner: {handle!r}") from None

    def _just_launched(self, handle: str) -> bool:
        """True while a wrapper this process started has not yet taken the run's lock."""
        with self._lock:
            proc = self._children.get(handle)
        if proc is None or proc.poll() is not None:
            return False
        return not (self._folder(handle) / "begun.json").exists()

    def _reap(self, handle: str) -> None:
        with self._lock:
            proc = self._children.get(handle)
            if proc is not None and proc.poll() is not None:
                del self._children[handle]

    @staticmethod
    def _wrapper_alive(folder: Path) -> bool:
        try:
            fd = os.open(folder / "lock", os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _outcome(self, folder: Path) -> RunOutcome | None:
        data = _read_json(folder / "exit.json")
        if data is None:
            return None
        log = _tail(folder / "module.log", self.settings.max_log_bytes)
        if data.get("error"):
            return RunOutcome(exit_code=None, log=log, error=str(data["error"]))
        code = data.get("exit_code")
        if data.get("cancelled"):
            how = f"killed by {data['signal']}" if data.get("signal") else f"exit code {code}"
            return RunOutcome(exit_code=None, log=log, error=f"cancelled ({how})")
        return RunOutcome(exit_code=int(code) if code is not None else None, log=log)


@hookimpl
def register_runners(register: RegisterFn) -> None:
    register("local", LocalRunnerSettings, LocalRunner)
