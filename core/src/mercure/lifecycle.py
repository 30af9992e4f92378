"""What every plugin instance shares: its name, its own settings, a context, start and close.

The services create each configured instance once per process, call :meth:`Plugin.start`
before first use and :meth:`Plugin.close` on shutdown (also after a failed start), so that
connections, threads and sockets end cleanly. Which methods may run on several threads at once
is stated by each kind's contract (:mod:`mercure.targets`, :mod:`mercure.runners`,
:mod:`mercure.notifiers`, :mod:`mercure.metrics`, :mod:`mercure.receivers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import BaseModel

SettingsT = TypeVar("SettingsT", bound=BaseModel)


@dataclass(frozen=True)
class PluginContext:
    """What a plugin instance may know about its surroundings, beyond its own settings."""

    kind: str
    instance: str
    appliance_name: str = "master"
    state_folder: Path | None = None
    """A folder of this instance's own under the spool, for state that must survive a restart
    (created on first use by :meth:`state_dir`); ``None`` where there is no spool."""

    def state_dir(self) -> Path:
        if self.state_folder is None:
            raise RuntimeError(f"{self.kind} '{self.instance}' has no state folder here")
        self.state_folder.mkdir(parents=True, exist_ok=True)
        return self.state_folder


class Plugin(Generic[SettingsT]):
    """Base of runners, notifiers, metrics sinks and receivers: settings in, start, close."""

    def __init__(self, name: str, settings: SettingsT, context: PluginContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context

    def start(self) -> None:
        """Open connections or start threads; raise with a clear reason if it cannot."""

    def close(self) -> None:
        """Release what :meth:`start` or later calls opened; called once, also after errors."""

    def __enter__(self) -> Plugin[SettingsT]:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Plugin", "PluginContext", "SettingsT"]
