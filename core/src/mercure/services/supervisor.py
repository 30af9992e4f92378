"""Starts the requested services in this process and stops them cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from mercure.builtin.dicom_admission import StatsMetrics
from mercure.builtin.dicom_receiver import dicom_receiver_for
from mercure.logs import get_logger
from mercure.metrics import Metric
from mercure.plugin_services import PluginService, ServiceContext, plugin_service_names
from mercure.plugin_settings import NoSettings
from mercure.receivers import Receiver, ReceiverContext
from mercure.services.base import Service
from mercure.services.cleaner import Cleaner
from mercure.services.config_watch import ConfigWatcher
from mercure.services.dispatcher import Dispatcher
from mercure.services.ledger import LedgerService, check_ledger_settings
from mercure.services.notifier import NotifierService
from mercure.services.processor import Processor
from mercure.services.receiver_pool import ReceiverPool
from mercure.services.router import Router
from mercure.services.runtime import Runtime

SERVICES = ("receiver", "router", "processor", "dispatcher", "cleaner", "notifier", "ledger")
log = get_logger("mercure.run")
RUN_EVENT_INTERVAL = 60.0
"""mercure sends ``events.run`` once a minute from each running service: a heartbeat."""


class Supervisor:
    """The services of one process."""

    def __init__(
        self,
        runtime: Runtime,
        services: list[str] | tuple[str, ...] | None = None,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        # Plugin services: the configured instances, and (with --only) any registered type.
        configured = plugin_service_names(runtime)
        registered = runtime.plugins.registry.names("service")
        if services is None:
            services = (*SERVICES, *configured)
        known = [*SERVICES, *configured, *(t for t in registered if t not in configured)]
        unknown = [s for s in services if s not in known]
        if unknown:
            raise ValueError(
                f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(known)}"
            )
        self.runtime = runtime
        self.names = list(services)
        self.plugin_services: list[PluginService[Any]] = []
        if "ledger" in self.names:
            check_ledger_settings(runtime)
        self.receivers: list[Receiver] = []
        self.services: list[Service] = []
        self.stopped = threading.Event()
        self.pool: ReceiverPool | None = None
        #: Re-reads the configuration file when it changes (none for the built-in default).
        self.watcher = ConfigWatcher(runtime, config_path, overrides) if config_path else None

    def start(self) -> None:
        rt = self.runtime
        rt.start()
        rt.plugins.notify("on_startup", config=rt.config, services=self.names)
        rt.metrics(*(Metric("events.boot", 1, service=name) for name in self.names))
        if "router" in self.names:
            self.services.append(Router(rt))
        if "processor" in self.names:
            self.services.append(Processor(rt))
        if "dispatcher" in self.names:
            self.services.append(Dispatcher(rt))
        if "cleaner" in self.names:
            self.services.append(Cleaner(rt))
        if "notifier" in self.names:
            self.services.append(NotifierService(rt))
        if "ledger" in self.names:
            self.services.append(LedgerService(rt))
        router = next((s for s in self.services if isinstance(s, Router)), None)
        processor = next((s for s in self.services if isinstance(s, Processor)), None)
        dispatcher = next((s for s in self.services if isinstance(s, Dispatcher)), None)
        if router is not None and dispatcher is not None:
            router.on_jobs_created.append(dispatcher.wake)
        if router is not None and processor is not None:
            router.on_jobs_created.append(processor.wake)
        if processor is not None and dispatcher is not None:
            processor.on_jobs_created.append(dispatcher.wake)
        for service in self.services:
            service.start()
        if "receiver" in self.names:
            dicom = dicom_receiver_for(rt.config, rt.spool)
            extra = rt.config.dicom_receiver.processes - 1
            dicom.reuse_port = bool(extra)
            dicom.start()
            self.receivers.append(dicom)
            rt.metrics_hub.add_gauges(rt.config.metrics_interval, StatsMetrics(dicom.stats))
            if extra:
                self.pool = ReceiverPool(rt.config, dicom.port, extra, fsync=rt.fsync)
                self.pool.start()
            for inst in rt.config.plugin_instances("receiver"):
                impl = rt.plugins.registry.get("receiver", inst.type_name).implementation
                context = ReceiverContext(
                    "receiver", inst.name, rt.config.appliance_name, spool=rt.spool
                )
                receiver: Receiver[Any] = impl(inst.name, inst.settings, context)
                receiver.start()
                self.receivers.append(receiver)
        self._start_plugin_services()
        for name in self.names:
            rt.service_event(name, "BOOT", f"{name} started")
        log.info("services started", services=self.names)

    def _start_plugin_services(self) -> None:
        rt = self.runtime
        configured = {i.name: i for i in rt.config.plugin_instances("service")}
        for name in self.names:
            if name in SERVICES:
                continue
            inst = configured.get(name)
            plugin_type = rt.plugins.registry.get("service", inst.type_name if inst else name)
            model = plugin_type.config_model or NoSettings
            settings = inst.settings if inst else model()
            state = rt.outbox.folder.parent / "plugin-state" / "service" / name
            context = ServiceContext("service", name, rt.config.appliance_name, state, runtime=rt)
            service: PluginService[Any] = plugin_type.implementation(name, settings, context)
            try:
                service.start()
            except BaseException:
                service.close()
                raise
            self.plugin_services.append(service)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        for plugin_service in reversed(self.plugin_services):
            try:
                plugin_service.close()
            except Exception as exc:
                log.warning("closing service failed", service=plugin_service.name, error=str(exc))
        if self.pool is not None:
            self.pool.stop()
        for receiver in self.receivers:
            receiver.stop()
        for name in self.names:
            if name != "ledger":
                self.runtime.service_event(name, "SHUTDOWN", f"{name} stopped")
        for service in self.services:
            service.stop()
        if "ledger" in self.names:
            self.runtime.service_event("ledger", "SHUTDOWN", "ledger stopped")
        self.runtime.metrics(*(Metric("events.shutdown", 1, service=n) for n in self.names))
        self.runtime.close()
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
            last_run = time.monotonic()
            while not stop.wait(1.0):
                if self.pool is not None:
                    self.pool.check()
                if self.watcher is not None:
                    try:
                        self.watcher.check()
                    except Exception:  # a reload must never stop the router
                        log.exception("re-reading the configuration failed")
                if time.monotonic() - last_run >= RUN_EVENT_INTERVAL:
                    last_run = time.monotonic()
                    self.runtime.metrics(*(Metric("events.run", 1, service=n) for n in self.names))
        finally:
            self.stop()
