"""The contract for processing runners (docker, nomad, local): run a module over a job folder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mercure.config import Config, Module


@dataclass(frozen=True)
class ProcessingRun:
    """One module run: input folder (instances + task.json) and the output folder to fill."""

    task_id: str
    module_name: str
    module: Module
    input_folder: Path
    output_folder: Path
    settings: dict[str, Any]


class Runner(ABC):
    """Runs processing modules; a container reads ``/tmp/data``, writes ``/tmp/output``."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @abstractmethod
    def run(self, run: ProcessingRun) -> int:
        """Run the module to completion and return its exit code."""
