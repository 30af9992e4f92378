"""The contract for processing runners (local, docker, nomad): run one module over a job folder.

The processor prepares a :class:`ProcessingRun` (input folder with the instances, their tags
and ``task.json``; an empty output folder; the module's settings and environment) and asks the
configured runner to :meth:`Runner.launch` it. The returned handle (a process id, a container
id, a Nomad job id) is written to the job before the processor waits, so a processor that was
restarted while a module ran calls :meth:`Runner.wait` with that handle again instead of
starting the module twice. The processor enforces the module's timeout by calling
:meth:`Runner.cancel`.

A processor can also die after ``launch`` started the module but before the handle was
written. It then calls ``launch`` again with the same :attr:`ProcessingRun.run_id`, so
``launch`` must be idempotent per ``run_id``: if a run with that id exists (running or
ended), return its handle instead of starting another (a container named after the id, a
Nomad dispatch with the id as its idempotency token, a marker in :attr:`ProcessingRun.run_folder`).

Lifecycle of one run, as the processor drives it::

    handle = runner.launch(run)            # persisted with the job at once
    while (outcome := runner.wait(handle, 1.0)) is None:
        if past the module's timeout:
            runner.cancel(handle)          # repeated every few seconds until it ended
    record(outcome)                        # exit code, log, error -> the job
    runner.cleanup(handle)

A processor that stops (SIGTERM) leaves running modules running and the next processor
re-attaches with :meth:`Runner.wait`; ``wait`` must therefore work for a handle returned by
another process, on another runner instance of the same configuration.

Threading: one runner instance serves every processor thread of its process; ``launch``,
``wait``, ``cancel`` and ``cleanup`` may be called concurrently for different handles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercure.lifecycle import Plugin, SettingsT

if TYPE_CHECKING:
    from mercure.config import Module

#: Where mercure mounts a module's folders inside its container.
CONTAINER_IN_DIR = "/tmp/data"
CONTAINER_OUT_DIR = "/tmp/output"
CONTAINER_PERSISTENCE_DIR = "/tmp/persistence"


def folder_environment(in_dir: str, out_dir: str) -> dict[str, str]:
    """mercure's folder variables for a module, with the MONAI and Holoscan aliases."""
    return {
        "MERCURE_IN_DIR": in_dir,
        "MERCURE_OUT_DIR": out_dir,
        "MONAI_INPUTPATH": in_dir,
        "MONAI_OUTPUTPATH": out_dir,
        "HOLOSCAN_INPUT_PATH": in_dir,
        "HOLOSCAN_OUTPUT_PATH": out_dir,
    }


@dataclass(frozen=True)
class ProcessingRun:
    """One module run, prepared by the processor."""

    task_id: str
    module_name: str
    module: Module
    input_folder: Path
    output_folder: Path
    settings: dict[str, Any]
    step: int = 0
    """Position in a chain of modules (0 for the first or only one)."""
    environment: dict[str, str] = field(default_factory=dict)
    """The module's own environment (its ``environment`` setting); the runner adds
    :func:`folder_environment` for the paths the module sees."""
    persistence_folder: Path | None = None
    """Host folder to mount for a module with ``requires_persistence``."""
    timeout: float = 0.0
    """Seconds the processor allows; 0: no limit. The processor cancels, not the runner."""
    allow_root: bool = False
    """``support_root_modules``: the module may run as root if it ``requires_root``."""
    run_id: str = ""
    """Identifies this run (job, attempt, step) across processor restarts: ``launch`` called
    twice with one ``run_id`` must start the module once (see the module docstring). Safe as
    a container or job name: letters, digits, ``-`` and ``_`` only, at most 80 characters."""
    run_folder: Path | None = None
    """A folder of this run's own inside the job folder (it exists and is empty at the first
    ``launch``) for the runner's files: control files, a log. Kept until :meth:`Runner.cleanup`
    and visible to processes that re-attach."""


@dataclass
class RunOutcome:
    """How a run ended: the module's exit code and log, or why it never got to exit."""

    exit_code: int | None
    log: str = ""
    """The module's standard output and error, interleaved (the end of it, if very long)."""
    error: str | None = None
    """The runner's own reason when the module did not run to an exit code (image missing,
    allocation lost, cancelled); ``exit_code`` is then ``None``."""

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.exit_code == 0


class RunnerError(Exception):
    """A run could not be started or followed (engine down, image missing, token expired).

    The message is recorded with the job; say what failed and what the operator can do.
    """


class RunnerUnavailable(RunnerError):
    """The engine cannot be reached right now (restarting, network down): try again later.

    Raised from ``launch``, the processor keeps the step and launches again with a growing
    pause, for up to :data:`LAUNCH_PATIENCE` seconds, before the job fails with the message;
    ``launch`` is idempotent per ``run.run_id``, so a launch that did reach the engine is not
    started twice.
    """


LAUNCH_PATIENCE = 900.0
"""Seconds a step whose runner is unavailable is launched again before its job fails."""


class Runner(Plugin[SettingsT], ABC):
    """Runs processing modules; see the module docstring for the threading rules."""

    @classmethod
    def check_module(
        cls, settings: SettingsT | None, name: str, module: Module
    ) -> list[tuple[str, str]]:
        """Configuration errors of one module for this runner: ``(field, message)`` pairs.

        Called when the configuration loads (``mercure config check`` included), for every
        module, with the settings of each configured instance of this runner, so that a
        disallowed ``docker_arguments`` or a missing command is reported before any job
        runs. (The built-in ``local`` runner, when nobody configured it, is called with
        ``None`` for the modules that enabled rules use.) ``field`` is a key of the module
        (``docker_arguments``); the error is shown at ``modules.<name>.<field>``.
        """
        return []

    @abstractmethod
    def launch(self, run: ProcessingRun) -> str:
        """Start the module and return a handle that identifies the run across restarts.

        Idempotent per ``run.run_id``. Raise :class:`RunnerError` when the module cannot be
        started (the job then fails with the message), :class:`RunnerUnavailable` when the
        engine cannot be reached now (launched again later); the folders, environment and settings
        are all in ``run``, and the module's definition (``run.module.docker_tag``,
        ``run.module.command``, ...) says what to start.
        """

    @abstractmethod
    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        """Wait up to ``timeout`` seconds; the outcome once the run ended, else ``None``.

        Must work for a handle returned by another process (the processor restarted). Raise
        :class:`RunnerError` when the run cannot be followed right now (engine restarting):
        the processor logs it and asks again, until the module's timeout.
        """

    @abstractmethod
    def cancel(self, handle: str) -> None:
        """Stop the run (and everything it started); waiting afterwards returns its outcome.

        Returns without waiting for the run to end. The processor calls it again every few
        seconds until ``wait`` returns the outcome, so a second call may escalate (SIGKILL
        after SIGTERM). The outcome of a cancelled run has ``exit_code=None`` and ``error``
        saying it was cancelled.
        """

    def cleanup(self, handle: str) -> None:
        """Remove what the run left (a stopped container) once its outcome was recorded.

        Never touches ``run.output_folder``: the processor has taken the results from it.
        """


__all__ = [
    "CONTAINER_IN_DIR",
    "CONTAINER_OUT_DIR",
    "CONTAINER_PERSISTENCE_DIR",
    "LAUNCH_PATIENCE",
    "ProcessingRun",
    "RunOutcome",
    "Runner",
    "RunnerError",
    "RunnerUnavailable",
    "folder_environment",
]
