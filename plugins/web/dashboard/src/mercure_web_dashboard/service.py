"""The ``web`` service of ``mercure run``: the dashboard beside the router's services."""

from __future__ import annotations

from mercure.plugin_services import PluginService, ServiceContext

from mercure_web_dashboard.server import WebServer
from mercure_web_dashboard.settings import WebSettings


class WebService(PluginService[WebSettings]):
    """Serves the dashboard from the ``mercure run`` process, with that process's runtime (so
    actions and target checks use the same plugin instances as the dispatcher)."""

    def __init__(self, name: str, settings: WebSettings, context: ServiceContext) -> None:
        super().__init__(name, settings, context)
        self.server = WebServer(self.runtime, settings, source="mercure run")

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.close()


__all__ = ["WebService"]
