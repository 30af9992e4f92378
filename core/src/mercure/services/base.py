"""A service is a loop that does one pass of work every ``interval`` seconds until stopped."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from mercure.logs import get_logger


class Service(ABC):
    """Runs :meth:`run_once` repeatedly in a thread; an exception in a pass is logged, not fatal."""

    name = "service"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.log = get_logger(f"mercure.{self.name}")

    @abstractmethod
    def run_once(self) -> int:
        """Do one pass; return how many items were handled (0 = idle)."""

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Run the next pass now instead of after the interval."""
        self.wake_event.set()

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                handled = self.run_once()
            except Exception:
                self.log.exception("pass failed; retrying after the scan interval")
                handled = 0
            if handled:
                continue
            self.wake_event.wait(self.interval)
            self.wake_event.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.wake_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.close()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources after the loop ended."""
