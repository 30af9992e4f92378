"""Settings of the ``prometheus`` metrics sink: the address is the only one an operator sets.

``"plugins": {"metrics_sinks": {"prometheus": {"address": "0.0.0.0:9464"}}}`` serves
``/metrics`` on every interface; ``"address": "9464"`` (a port alone) on loopback only.
"""

from __future__ import annotations

import ipaddress

from mercure.plugin_settings import PluginSettings
from pydantic import Field, field_validator

from mercure_metrics_prometheus.store import DEFAULT_BUCKETS


def parse_address(value: str) -> tuple[str, int]:
    """``"9464"`` -> loopback; ``"host:port"``; ``"[v6]:port"``. ``ValueError`` otherwise."""
    text = value.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r}: write an IPv6 address as [::1]:9464")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(
                f"{value!r} has no host: use 127.0.0.1:PORT (this machine only), "
                "0.0.0.0:PORT (every interface) or a port alone (loopback)"
            )
        if ":" in host:
            raise ValueError(f"{value!r}: write an IPv6 address in brackets, as [::1]:9464")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


class PrometheusSettings(PluginSettings):
    """Where ``/metrics`` is served; everything else has a default."""

    address: str
    """``host:port`` to listen on, or a port alone for loopback (``127.0.0.1``)."""
    prefix: str = "mercure"
    """First part of every name: ``mercure_incoming_files_total``."""
    buckets: list[float] = Field(default_factory=lambda: list(DEFAULT_BUCKETS), min_length=1)
    """Histogram bucket bounds in seconds, for timings such as ``dispatch.duration``."""
    max_series: int = Field(default=10_000, gt=0)
    """Series kept at most; beyond, new series are not exported (with a warning)."""
    process_metrics: bool = True
    """Also export the router process' own metrics (``process_*``, ``python_*``)."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value.strip()

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not value.replace("_", "").isalnum():
            raise ValueError(f"prefix {value!r} may hold only letters, digits and '_'")
        return value

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, value: list[float]) -> list[float]:
        if any(b <= 0 for b in value) or sorted(set(value)) != value:
            raise ValueError("buckets must be positive, ascending and without repeats")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)


__all__ = ["PrometheusSettings", "parse_address"]
