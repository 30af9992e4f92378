"""Settings of the ``graphite`` metrics sink.

``host`` and ``port`` are what mercure's ``graphite_ip`` and ``graphite_port`` map onto; the
rest has defaults and lives in ``plugins.metrics_sinks.graphite``.
"""

from __future__ import annotations

from mercure.plugin_settings import PluginSettings
from pydantic import Field, field_validator

from mercure_metrics_graphite.plaintext import CounterStyle, TagStyle


class GraphiteSettings(PluginSettings):
    """Where carbon listens and how metrics are named; see the plugin's README."""

    host: str
    """carbon's host name or address (mercure: ``graphite_ip``)."""
    port: int = Field(default=2003, ge=1, le=65535)
    """carbon's plaintext (line receiver) port (mercure: ``graphite_port``)."""
    prefix: str = "mercure"
    """First part of every path: ``<prefix>.<appliance>.<service>.<name>``."""
    tag_style: TagStyle = "path"
    counters: CounterStyle = "increments"
    connect_timeout: float = Field(default=2.0, gt=0)
    """Seconds to wait for a connection; while carbon is down each batch costs at most this."""
    send_timeout: float = Field(default=5.0, gt=0)
    """Seconds a batch may take to write (carbon pauses reading when its cache is full)."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise ValueError(
                f"{value!r} is not a host name or address; give carbon's host, e.g. 10.0.0.5"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(c.isspace() or c == ";" for c in value):
            raise ValueError(f"prefix {value!r} may not contain spaces or ';'")
        return value.strip(".")


__all__ = ["GraphiteSettings"]
