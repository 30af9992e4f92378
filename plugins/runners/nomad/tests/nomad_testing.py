"""Helpers of the nomad runner's tests (imported by the tests and by ``conftest``)."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from mercure.runners import RunOutcome
from mercure.testing import wait_for
from mercure_runner_nomad import NomadRunner


@dataclass(frozen=True)
class Shared:
    router: Path
    client: Path


def module_script(folder: Path, name: str, body: str) -> list[str]:
    """A Python script that stands for a module image's entry point; its argv."""
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def outcome_of(runner: NomadRunner, handle: str, timeout: float = 60.0) -> RunOutcome:
    """Wait (in the processor's one-second slices) for the run's outcome."""
    found: RunOutcome = wait_for(
        lambda: runner.wait(handle, 1.0), timeout=timeout, interval=0, what="the run's outcome"
    )
    return found
