"""A runner plugin to copy and rename: runs each module as a program named in its settings.

Configured as::

    "process_runner": "template",
    "plugins": {"runners": {"template": {"commands": {"anonymizer": ["/opt/anon/run"]}}}}

It shows the whole runner contract (``mercure.runners``): ``check_module`` reports a module the
runner cannot run when the configuration loads; ``launch`` starts a run and returns a handle
that another process can pick up (here: the run's own folder, holding its pid, log and exit
code), so a processor restarted while a module runs waits for that run instead of starting it
twice; ``wait`` returns the outcome once the run ended; ``cancel`` stops it with everything it
started (its own process group).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from mercure import hookimpl
from mercure.config import Module
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn
from mercure.runners import ProcessingRun, Runner, RunnerError, RunOutcome, folder_environment

LOG_TAIL = 64 * 1024
# The wrapper records the module's exit code atomically, so that any process can read it later.
_RECORD_EXIT = 'echo $? >"$RUN_DIR/exit.tmp"; mv "$RUN_DIR/exit.tmp" "$RUN_DIR/exit"'
WRAPPER = '"$@" >>"$RUN_DIR/log" 2>&1; ' + _RECORD_EXIT


class TemplateRunnerSettings(PluginSettings):
    """Settings of the ``template`` runner."""

    commands: dict[str, list[str]] = {}
    """Module name -> the program and its arguments."""


class TemplateRunner(Runner[TemplateRunnerSettings]):
    """Runs modules as local programs in their own process group."""

    @classmethod
    def check_module(
        cls, settings: TemplateRunnerSettings | None, name: str, module: Module
    ) -> list[tuple[str, str]]:
        if settings is None or name not in settings.commands:
            return [("", f"the template runner has no command for module '{name}'")]
        return []

    def launch(self, run: ProcessingRun) -> str:
        argv = self.settings.commands.get(run.module_name)
        if not argv:
            raise RunnerError(f"no command for module '{run.module_name}' in the runner settings")
        run_dir = run.run_folder or run.output_folder.parent / f".run-{run.step}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "pid").exists():
            # Launched before (the processor died before it recorded the handle): never twice.
            return str(run_dir)
        env = {
            **os.environ,
            **run.environment,
            **folder_environment(str(run.input_folder), str(run.output_folder)),
            "RUN_DIR": str(run_dir),
        }
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", WRAPPER, "sh", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise RunnerError(f"cannot start {argv[0]}: {exc.strerror}") from exc
        (run_dir / "pid").write_text(str(proc.pid))
        return str(run_dir)

    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        run_dir = Path(handle)
        deadline = time.monotonic() + timeout
        while True:
            if (run_dir / "cancelled").exists():
                return RunOutcome(None, self._log(run_dir), error="cancelled")
            with contextlib.suppress(FileNotFoundError, ValueError):
                code = int((run_dir / "exit").read_text().strip())
                return RunOutcome(code, self._log(run_dir))
            if not self._alive(run_dir):
                with contextlib.suppress(FileNotFoundError, ValueError):  # it just finished
                    return RunOutcome(int((run_dir / "exit").read_text()), self._log(run_dir))
                return RunOutcome(None, self._log(run_dir), error="the run ended without exit code")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def cancel(self, handle: str) -> None:
        run_dir = Path(handle)
        (run_dir / "cancelled").touch()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.killpg(int((run_dir / "pid").read_text()), signal.SIGKILL)

    @staticmethod
    def _alive(run_dir: Path) -> bool:
        try:
            pid = int((run_dir / "pid").read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                return False
        return True

    @staticmethod
    def _log(run_dir: Path) -> str:
        try:
            with open(run_dir / "log", "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - LOG_TAIL))
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""


@hookimpl
def register_runners(register: RegisterFn) -> None:
    """Add the ``template`` runner type."""
    register("template", TemplateRunnerSettings, TemplateRunner)
