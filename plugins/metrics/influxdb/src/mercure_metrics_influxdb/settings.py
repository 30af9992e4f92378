"""Settings of the ``influxdb`` metrics sink.

``host``, ``token``, ``org`` and ``bucket`` are what mercure's ``influxdb_host``,
``influxdb_token``, ``influxdb_org`` and ``influxdb_bucket`` map onto; the rest has defaults
and lives in ``plugins.metrics_sinks.influxdb``.
"""

from __future__ import annotations

from typing import Literal

import httpx
from mercure.plugin_settings import PluginSettings
from mercure.secrets import OptionalSecret
from pydantic import Field, field_validator, model_validator


class InfluxDBSettings(PluginSettings):
    """Where and how to write; see the plugin's README for every field."""

    host: str
    """InfluxDB's URL, e.g. ``http://influxdb:8086`` (mercure: ``influxdb_host``)."""
    api: Literal["v2", "v1"] = "v2"
    """``v2``: ``/api/v2/write?org=&bucket=`` with ``Authorization: Token`` (InfluxDB 2.x, 3.x,
    and 1.8+); ``v1``: ``/write?db=`` (InfluxDB 1.x)."""
    token: OptionalSecret = ""
    org: str = ""
    bucket: str = ""
    database: str = ""
    """v1: the database to write to."""
    retention_policy: str = ""
    """v1: the retention policy (empty: the database's default)."""
    username: str = ""
    """v1: user name for basic authentication (empty: none, or the token if one is set)."""
    password: OptionalSecret = ""
    prefix: str = "mercure"
    """First part of the measurement names: ``<prefix>.<appliance>.<service>.<name>``."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags added to every point (a metric's own tags win), e.g. ``{"site": "north"}``."""
    gzip: bool = True
    timeout: float = Field(default=10.0, gt=0)
    """Seconds for a whole write; a slower InfluxDB loses that batch (counted, logged)."""
    connect_timeout: float = Field(default=3.0, gt=0)
    ca_bundle: str = ""
    """A CA certificate file (PEM) for an https host with a private CA."""
    verify_tls: bool = True

    @field_validator("host")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("InfluxDB's URL is empty; give e.g. http://influxdb:8086")
        if "://" not in value:
            value = "http://" + value
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"{value!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{value!r} is not an http(s) URL such as http://influxdb:8086")
        return value.rstrip("/")

    @field_validator("tags")
    @classmethod
    def _tag_keys(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k in ("time", "_field", "_measurement"))
        if reserved:
            raise ValueError(f"InfluxDB does not accept the tag key(s) {', '.join(reserved)}")
        empty = sorted(k for k, v in value.items() if not k or not v)
        if empty:
            raise ValueError(f"tags need a key and a value; empty: {', '.join(map(repr, empty))}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> InfluxDBSettings:
        if self.api == "v2":
            missing = [name for name in ("token", "org", "bucket") if not getattr(self, name)]
            if missing:
                raise ValueError(
                    f"the v2 write API needs {', '.join(missing)} (mercure: "
                    f"{', '.join('influxdb_' + m for m in missing)}); for InfluxDB 1.x set "
                    '"api": "v1" and "database"'
                )
        elif not self.database:
            raise ValueError('the v1 write API needs "database" (the InfluxDB 1.x database)')
        if self.password and not self.username:
            raise ValueError('"password" is set without "username"')
        return self


__all__ = ["InfluxDBSettings"]
