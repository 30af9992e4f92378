"""Re-reading ``mercure.json`` while the router runs, as mercure's ``read_config`` does.

The supervisor calls :meth:`ConfigWatcher.check` about once a second. When the file's
modification time or size changed, it is loaded and validated like at start; a file that
fails (invalid JSON, an unknown target type, a rule that does not compile) is logged with
every error and the running configuration stays. A valid one replaces the running
configuration for every service of this process at once: rules, targets, modules,
priorities, triggers and intervals that are read per pass take effect on the next pass; a
target whose settings changed is rebuilt. Settings that shape the processes themselves
(ports, spool folders, worker counts, plugin instances) are logged as needing a restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mercure.config import Config, ConfigError, load_config
from mercure.logs import get_logger
from mercure.services.runtime import Runtime

log = get_logger("mercure.config")

RESTART_FIELDS = (
    "port",
    "incoming_folder",
    "studies_folder",
    "outgoing_folder",
    "success_folder",
    "error_folder",
    "discard_folder",
    "processing_folder",
    "outbox_folder",
    "dicom_receiver",
    "dispatcher_workers",
    "processor_workers",
    "process_runner",
    "plugins",
    "plugin_folder",
    "graphite_ip",
    "graphite_port",
    "influxdb_host",
    "influxdb_token",
    "influxdb_org",
    "influxdb_bucket",
    "email_notification_from",
    "webhook_certificate_location",
    "log_level",
)


class ConfigWatcher:
    """Watches one configuration file and swaps the runtime's configuration when it changes."""

    def __init__(
        self,
        runtime: Runtime,
        path: Path,
        overrides: dict[str, Any] | None = None,
        on_change: list[Callable[[Config], None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.overrides = dict(overrides or {})
        self.on_change = on_change or []
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def check(self) -> bool:
        """Reload if the file changed; True if a new configuration is now running."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            config, warnings = load_config(self.path, self.runtime.plugins.registry)
        except ConfigError as exc:
            log.error(
                "the configuration file changed but is invalid; the running configuration is kept",
                source=str(self.path),
                errors=[f"{where}: {message}" for where, message in exc.errors],
            )
            return False
        if self.overrides:
            config = config.model_copy(update=self.overrides)
        old = self.runtime.config
        restart = [f for f in RESTART_FIELDS if getattr(old, f, None) != getattr(config, f, None)]
        self.runtime.reconfigure(config)
        for warning in warnings:
            log.warning("configuration warning", detail=warning)
        log.info(
            "configuration reloaded",
            source=str(self.path),
            rules=len(config.rules),
            targets=len(config.targets),
            needs_restart=restart or None,
        )
        if restart:
            log.warning(
                "these settings changed but take effect only after a restart",
                settings=restart,
            )
        for callback in self.on_change:
            try:
                callback(config)
            except Exception as exc:
                log.warning("applying the new configuration failed", error=str(exc))
        return True


__all__ = ["RESTART_FIELDS", "ConfigWatcher"]
