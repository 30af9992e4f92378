"""Services that plugins add to ``mercure run``: a web dashboard, an API, a bridge.

A service type is registered with ``register_services`` and configured under
``plugins.services`` like every other kind (``{"web": {"port": 8000}}``); ``mercure run``
starts each configured instance beside the core services, and ``mercure run --only web``
starts one alone (with its defaults when it is not configured). Unlike the other kinds, a
service needs to see the router as a whole (configuration, job store, ledger, plugins): its
context carries the process's :class:`mercure.services.runtime.Runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mercure.lifecycle import Plugin, PluginContext, SettingsT

if TYPE_CHECKING:
    from mercure.services.runtime import Runtime


@dataclass(frozen=True)
class ServiceContext(PluginContext):
    """A plugin context plus the runtime of the ``mercure run`` process."""

    runtime: Runtime | None = None


class PluginService(Plugin[SettingsT]):
    """A long-running service of a plugin: ``start`` returns once it serves (from threads of
    its own), ``close`` stops it. Both are called on the main thread of ``mercure run``."""

    def __init__(self, name: str, settings: SettingsT, context: ServiceContext) -> None:
        super().__init__(name, settings, context)
        if context.runtime is None:
            raise ValueError(f"service '{name}' needs the runtime in its context")
        self.runtime: Runtime = context.runtime


def plugin_service_names(runtime: Any) -> dict[str, str]:
    """Configured service instances of ``runtime``'s configuration: instance name -> type."""
    return {i.name: i.type_name for i in runtime.config.plugin_instances("service")}


__all__ = ["PluginService", "ServiceContext", "plugin_service_names"]
