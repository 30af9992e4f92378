"""The contract for receivers: services that accept instances and put them in the incoming spool."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mercure.config import Config
    from mercure.jobs.incoming import IncomingSpool


class Receiver(ABC):
    """A running receiver. ``start`` returns once it accepts connections; ``stop`` ends it."""

    def __init__(self, config: Config, spool: IncomingSpool) -> None:
        self.config = config
        self.spool = spool

    @abstractmethod
    def start(self) -> None:
        """Start accepting instances (in background threads)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop accepting; instances already answered Success are on disk."""
