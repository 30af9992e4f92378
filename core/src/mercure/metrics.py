"""The contract for metrics sinks (InfluxDB, Graphite, log)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mercure.config import Config


@dataclass(frozen=True)
class Metric:
    """One measurement, e.g. ``Metric("dispatcher.files_sent", 20, {"target": "pacs"})``."""

    name: str
    value: float
    tags: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class MetricsSink(ABC):
    """Receives batches of metrics; ``enabled`` says whether the configuration asks for it."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def enabled(self) -> bool:
        return True

    @abstractmethod
    def send(self, metrics: list[Metric]) -> None:
        """Deliver a batch; raise on failure (the caller logs it and drops the batch)."""
