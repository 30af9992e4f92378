"""Starts the requested services in this process and stops them cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import signal
import threading
from typing import Any

from mercure.builtin.dicom_receiver import DicomReceiver
from mercure.logs import get_logger
from mercure.receivers import Receiver
from mercure.services.base import Service
from mercure.services.cleaner import Cleaner
from mercure.services.dispatcher import Dispatcher
from mercure.services.receiver_pool import ReceiverPool
from mercure.services.router import Router
from mercure.services.runtime import Runtime

SERVICES = ("receiver", "router", "dispatcher", "cleaner")
log = get_logger("mercure.run")


class Supervisor:
    """The services of one process."""

    def __init__(self, runtime: Runtime, services: list[str] | tuple[str, ...] = SERVICES) -> None:
        unknown = [s for s in services if s not in SERVICES]
        if unknown:
            raise ValueError(
                f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}"
            )
        self.runtime = runtime
        self.names = list(services)
        self.receivers: list[Receiver] = []
        self.services: list[Service] = []
        self.stopped = threading.Event()
        self.pool: ReceiverPool | None = None

    def start(self) -> None:
        rt = self.runtime
        rt.plugins.notify("on_startup", config=rt.config, services=self.names)
        if "router" in self.names:
            self.services.append(Router(rt))
        if "dispatcher" in self.names:
            self.services.append(Dispatcher(rt))
        if "cleaner" in self.names:
            self.services.append(Cleaner(rt))
        router = next((s for s in self.services if isinstance(s, Router)), None)
        dispatcher = next((s for s in self.services if isinstance(s, Dispatcher)), None)
        if router is not None and dispatcher is not None:
            router.on_jobs_created.append(dispatcher.wake)
        for service in self.services:
            service.start()
        if "receiver" in self.names:
            for plugin_type in rt.plugins.registry.types["receiver"].values():
                receiver: Receiver = plugin_type.implementation(rt.config, rt.spool)
                extra = rt.config.dicom_receiver.processes - 1
                if extra and isinstance(receiver, DicomReceiver):
                    receiver.reuse_port = True
                receiver.start()
                self.receivers.append(receiver)
                if extra and isinstance(receiver, DicomReceiver):
                    self.pool = ReceiverPool(rt.config, receiver.port, extra, fsync=rt.fsync)
                    self.pool.start()
        log.info("services started", services=self.names)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        if self.pool is not None:
            self.pool.stop()
        for receiver in self.receivers:
            receiver.stop()
        for service in self.services:
            service.stop()
        self.stopped.set()
        log.info("services stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT."""
        stop = threading.Event()

        def handle(signum: int, frame: Any) -> None:
            log.info("signal received, stopping", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        try:
            while not stop.wait(1.0):
                if self.pool is not None:
                    self.pool.check()
        finally:
            self.stop()
