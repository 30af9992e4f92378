"""The contract for receivers: services that accept instances and put them in the incoming spool.

A receiver gets its own settings and a :class:`ReceiverContext` holding the spool. ``start``
returns once it accepts connections (serving in threads of its own); ``stop`` ends it, and every
instance it answered with success is durably in the spool by then (write it with
:meth:`mercure.jobs.incoming.IncomingSpool.store` before answering). The built-in ``dicom``
receiver is configured by mercure's ``port``, ``accept_compressed_images`` and
``dicom_receiver``; other receiver types by ``plugins.receivers.<name>``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mercure.lifecycle import Plugin, PluginContext, SettingsT

if TYPE_CHECKING:
    from mercure.jobs.incoming import IncomingSpool


@dataclass(frozen=True)
class ReceiverContext(PluginContext):
    """A plugin context plus the incoming spool the receiver writes to."""

    spool: IncomingSpool | None = None


class Receiver(Plugin[SettingsT], ABC):
    """A running receiver: ``start`` returns once it accepts connections; ``stop`` ends it."""

    def __init__(self, name: str, settings: SettingsT, context: ReceiverContext) -> None:
        super().__init__(name, settings, context)
        if context.spool is None:
            raise ValueError(f"receiver '{name}' needs a spool in its context")
        self.spool: IncomingSpool = context.spool

    @abstractmethod
    def start(self) -> None:
        """Start accepting instances (in background threads)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop accepting; instances already answered Success are on disk."""

    def close(self) -> None:
        self.stop()


__all__ = ["Receiver", "ReceiverContext"]
