"""What every service needs: configuration, plugins, spool folders, and event fan-out."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from mercure.config import Config, Rule
from mercure.events import TaskEvent
from mercure.jobs.incoming import IncomingSpool
from mercure.jobs.store import JobStore
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink
from mercure.notifiers import Notification, NotificationEvent, Notifier
from mercure.plugins import PluginManager
from mercure.targets import Target

log = get_logger("mercure.runtime")


@dataclass
class Runtime:
    """Shared state of one process; built once by :func:`build_runtime`."""

    config: Config
    plugins: PluginManager
    store: JobStore
    spool: IncomingSpool
    fsync: bool = True
    _targets: dict[str, Target[Any]] = field(default_factory=dict)
    _notifiers: list[Notifier] | None = None
    _sinks: list[MetricsSink] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def target(self, name: str) -> Target[Any]:
        """The implementation object of a configured target (created once, then reused)."""
        with self._lock:
            existing = self._targets.get(name)
            if existing is not None:
                return existing
            target_config = self.config.targets[name]
            plugin_type = self.plugins.registry.get("target", target_config.target_type)
            impl: Target[Any] = plugin_type.implementation(
                name, target_config, {"config": self.config}
            )
            self._targets[name] = impl
            return impl

    def emit(self, event: TaskEvent) -> None:
        """Tell every ``on_task_event`` observer; failures are logged, never raised."""
        self.plugins.notify("on_task_event", event=event)

    def notify_rule(
        self,
        event: NotificationEvent,
        rule_name: str,
        task_id: str,
        tags: dict[str, str],
        details: str = "",
    ) -> None:
        """Send a rule's notification (if the rule asks for this event) to every notifier."""
        rule: Rule | None = self.config.rules.get(rule_name)
        if rule is None:
            return
        wanted = {
            "reception": rule.notification_trigger_reception,
            "completion": rule.notification_trigger_completion,
            "error": rule.notification_trigger_error,
        }[event]
        if not wanted and rule.action != "notification":
            return
        if self._notifiers is None:
            self._notifiers = [
                t.implementation(self.config)
                for t in self.plugins.registry.types["notifier"].values()
            ]
        note = Notification(event, rule_name, rule, task_id, details, dict(tags))
        for notifier in self._notifiers:
            try:
                notifier.notify(note)
            except Exception as exc:
                log.warning(
                    "notification failed",
                    notifier=type(notifier).__name__,
                    rule=rule_name,
                    task_id=task_id,
                    error=str(exc),
                )

    def metrics(self, *metrics: Metric) -> None:
        if self._sinks is None:
            sinks = [
                t.implementation(self.config)
                for t in self.plugins.registry.types["metrics_sink"].values()
            ]
            self._sinks = [s for s in sinks if s.enabled]
        for sink in self._sinks:
            try:
                sink.send(list(metrics))
            except Exception as exc:
                log.warning("metrics sink failed", sink=type(sink).__name__, error=str(exc))

    def close(self) -> None:
        for target in self._targets.values():
            try:
                target.close()
            except Exception as exc:
                log.warning("closing target failed", target=target.name, error=str(exc))


def build_runtime(config: Config, plugins: PluginManager, *, fsync: bool = True) -> Runtime:
    store = JobStore.from_config(config, fsync=fsync)
    spool = IncomingSpool(config.folder("incoming"), fsync=fsync)
    return Runtime(config=config, plugins=plugins, store=store, spool=spool, fsync=fsync)
