"""What every service needs: configuration, plugin instances, spool folders, and event fan-out.

Plugin instances are created once per process from their validated settings (never the whole
configuration) and closed on shutdown. Notifications go to the durable outbox, metrics to the
bounded metrics hub, events to the ledger's durable queue: none makes a service wait.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercure.config import Config, Rule
from mercure.events import TaskEvent
from mercure.jobs.incoming import IncomingSpool
from mercure.jobs.store import STATES, JobStore
from mercure.ledger import LedgerSettings
from mercure.ledger.journal import Journal
from mercure.ledger.queue import EventQueue
from mercure.ledger.records import ServiceEvent, service_record, task_record
from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink
from mercure.metrics_hub import MetricsHub, metrics_for_event
from mercure.notifiers import NotificationEvent, Notifier
from mercure.outbox import Outbox
from mercure.payloads import render_notification
from mercure.plugins import PluginManager
from mercure.registry import Kind
from mercure.targets import Target

log = get_logger("mercure.runtime")


@dataclass
class Runtime:
    """Shared state of one process; built once by :func:`build_runtime`."""

    config: Config
    plugins: PluginManager
    store: JobStore
    spool: IncomingSpool
    outbox: Outbox
    fsync: bool = True
    metrics_hub: MetricsHub = field(default_factory=lambda: MetricsHub([]))
    journal: Journal | None = None
    """The ledger queue's writer; None when neither a ledger nor a monitor is configured."""
    _targets: dict[str, Target[Any]] = field(default_factory=dict)
    _notifiers: dict[str, Notifier[Any]] | None = None
    _started_notifiers: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: bool = False

    # -- plugin instances ----------------------------------------------------------------------

    def context(self, kind: Kind, name: str) -> PluginContext:
        """The context handed to one plugin instance."""
        state = self.outbox.folder.parent / "plugin-state" / kind / name
        return PluginContext(kind, name, self.config.appliance_name, state)

    def target(self, name: str) -> Target[Any]:
        """The implementation object of a configured target (created once, then reused)."""
        with self._lock:
            existing = self._targets.get(name)
            if existing is not None:
                return existing
            target_config = self.config.targets[name]
            plugin_type = self.plugins.registry.get("target", target_config.target_type)
            impl: Target[Any] = plugin_type.implementation(
                name, target_config, self.context("target", name)
            )
            self._targets[name] = impl
            return impl

    def reconfigure(self, config: Config) -> None:
        """Run with ``config`` from now on (a reloaded ``mercure.json``).

        Targets whose settings changed, or that are gone, are closed and rebuilt on next use;
        notifier and metrics-sink instances stay as they started (a restart changes them).
        """
        with self._lock:
            old = self.config
            stale = [
                name
                for name in self._targets
                if name not in config.targets or config.targets[name] != old.targets.get(name)
            ]
            closing = [self._targets.pop(name) for name in stale]
            self.config = config
        for target in closing:
            try:
                target.close()
            except Exception as exc:
                log.warning("closing target failed", target=target.name, error=str(exc))

    def _notifier_instances(self) -> dict[str, Notifier[Any]]:
        with self._lock:
            if self._notifiers is None:
                made: dict[str, Notifier[Any]] = {}
                for inst in self.config.plugin_instances("notifier"):
                    impl = self.plugins.registry.get("notifier", inst.type_name).implementation
                    made[inst.name] = impl(
                        inst.name, inst.settings, self.context("notifier", inst.name)
                    )
                self._notifiers = made
            return self._notifiers

    def notifier(self, name: str) -> Notifier[Any]:
        """A configured notifier, started on first use; ``KeyError`` if not configured."""
        notifier = self._notifier_instances()[name]
        with self._lock:
            if name not in self._started_notifiers:
                notifier.start()
                self._started_notifiers.add(name)
        return notifier

    def start(self) -> None:
        """Start the metrics sinks (each on its own thread) and the periodic gauges."""
        if self._started:
            return
        self._started = True
        sinks: list[tuple[str, MetricsSink[Any]]] = []
        for inst in self.config.plugin_instances("metrics_sink"):
            impl = self.plugins.registry.get("metrics_sink", inst.type_name).implementation
            sink: MetricsSink[Any] = impl(
                inst.name, inst.settings, self.context("metrics_sink", inst.name)
            )
            try:
                sink.start()
            except Exception as exc:
                # A sink that cannot start must not stop the router: its metrics are lost.
                log.error("metrics sink did not start; it gets no metrics", sink=inst.name,
                          error=f"{exc.__class__.__name__}: {exc}")  # fmt: skip
                continue
            sinks.append((inst.name, sink))
        self.metrics_hub = MetricsHub(sinks)
        self.metrics_hub.add_gauges(self.config.metrics_interval, self.gauges)
        self.metrics_hub.start()

    # -- events, notifications, metrics --------------------------------------------------------

    @property
    def ledger_digests(self) -> bool:
        """Whether delivered instances get their SOP Instance UID and digest recorded."""
        return self.journal is not None and self.config.ledger_digests

    def emit(self, event: TaskEvent) -> None:
        """Queue the event for the ledger, derive metrics, then tell every ``on_task_event``
        observer; never raises."""
        if self.journal is not None:
            self.journal.record(task_record(event))
        try:
            self.metrics_hub.record(*metrics_for_event(event))
        except Exception as exc:  # metrics are best effort
            log.warning("metrics from an event failed", error=str(exc))
        self.plugins.notify("on_task_event", event=event)

    def service_event(
        self, service: str, event: str, description: str = "", severity: int = 0
    ) -> None:
        """Queue a service event (mercure's BOOT, SHUTDOWN, ...) for the ledger and monitors."""
        if self.journal is not None:
            self.journal.record(service_record(ServiceEvent(service, event, severity, description)))

    def metrics(self, *metrics: Metric) -> None:
        """Record metrics for the sinks; never blocks, never raises."""
        self.metrics_hub.record(*metrics)

    def notify_rule(
        self,
        event: NotificationEvent,
        rule_name: str,
        task_id: str,
        tags: dict[str, str],
        details: str = "",
        *,
        always: bool = False,
    ) -> int:
        """Queue a rule's notification (if the rule asks for this event) in the outbox.

        Rendered now, with mercure's templates; each configured notifier that wants it gets
        its own durable entry. Returns how many entries were queued. ``always`` sends whatever
        the rule's trigger says (completion on request, notification-only rules).
        """
        rule: Rule | None = self.config.rules.get(rule_name)
        if rule is None:
            return 0
        wanted = {
            "reception": rule.notification_trigger_reception,
            "completion": rule.notification_trigger_completion,
            "error": rule.notification_trigger_error,
        }[event]
        if not (wanted or always or rule.action == "notification"):
            return 0
        note = render_notification(
            event,
            rule_name,
            rule,
            task_id,
            details=details,
            patient={
                "acc": tags.get("AccessionNumber"),
                "mrn": tags.get("PatientID"),
                "patient_name": tags.get("PatientName"),
            },
            device_serial_number=tags.get("DeviceSerialNumber"),
            phi=self.config.phi_notifications,
        )
        queued = 0
        for name, notifier in self._notifier_instances().items():
            try:
                if not notifier.wants(note):
                    continue
                self.outbox.put(name, note)
                queued += 1
            except Exception as exc:
                log.error(
                    "notification could not be queued",
                    rule=rule_name,
                    task_id=task_id,
                    notifier=name,
                    error=f"{exc.__class__.__name__}: {exc}",
                )
        return queued

    def gauges(self) -> list[Metric]:
        """Jobs per state, queue depths and spool disk space, as gauges."""
        found: list[Metric] = []
        for state in STATES:
            count = sum(1 for _ in self.store.list([state]))
            found.append(Metric(f"jobs.{state}", count, kind="gauge", service="spool"))
        incoming = len(self.spool.series())
        found.append(Metric("queue.incoming_series", incoming, kind="gauge", service="spool"))
        found.append(Metric("queue.notifications", self.outbox.count(), kind="gauge",
                            service="spool"))  # fmt: skip
        usage = shutil.disk_usage(self.config.folder("incoming"))
        found.append(Metric("spool.free_bytes", usage.free, kind="gauge", service="spool"))
        found.append(
            Metric("spool.free_percent", 100.0 * usage.free / max(usage.total, 1), kind="gauge",
                   service="spool")
        )  # fmt: skip
        return found

    def close(self) -> None:
        for target in self._targets.values():
            try:
                target.close()
            except Exception as exc:
                log.warning("closing target failed", target=target.name, error=str(exc))
        for name in sorted(self._started_notifiers):
            try:
                (self._notifiers or {})[name].close()
            except Exception as exc:
                log.warning("closing notifier failed", notifier=name, error=str(exc))
        self._started_notifiers.clear()
        self.metrics_hub.close()
        if self.journal is not None:
            self.journal.close()


def outbox_folder(config: Config) -> Path:
    """``outbox_folder``, or ``outbox`` beside ``outgoing/`` when it is not set."""
    if config.outbox_folder:
        return Path(config.outbox_folder)
    return config.folder("outgoing").parent / "outbox"


def build_runtime(config: Config, plugins: PluginManager, *, fsync: bool = True) -> Runtime:
    store = JobStore.from_config(config, fsync=fsync)
    spool = IncomingSpool(config.folder("incoming"), fsync=fsync)
    outbox = Outbox(outbox_folder(config), fsync=fsync)
    return Runtime(
        config=config,
        plugins=plugins,
        store=store,
        spool=spool,
        outbox=outbox,
        fsync=fsync,
        journal=ledger_journal(config, fsync=fsync),
    )


def ledger_journal(config: Config, *, fsync: bool = True) -> Journal | None:
    """The ledger queue's writer, if a ledger database or a monitor will read the queue."""
    settings = LedgerSettings.of(config)
    if not settings.enabled and not config.plugin_instances("monitor"):
        return None
    return Journal(EventQueue(settings.queue_folder, fsync=fsync))
