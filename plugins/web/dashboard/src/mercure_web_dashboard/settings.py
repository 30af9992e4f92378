"""The dashboard's settings: ``plugins.services.web`` in ``mercure.json`` (every key optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mercure.config import Config
from mercure.plugin_settings import PluginSettings
from pydantic import Field, model_validator

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")


class WebSettings(PluginSettings):
    """Where the dashboard listens, who may log in, and what each role may see."""

    host: str = "127.0.0.1"
    """Address to listen on; loopback by default (put a TLS reverse proxy in front, or set
    ``tls_certificate``, before listening on another address)."""
    port: int = Field(default=8000, ge=0, le=65535)
    users_file: str = ""
    """The users file (JSON, mercure's ``users.json`` form, argon2 hashes); empty:
    ``web-users.json`` beside the spool folders."""
    session_idle_timeout: int = Field(default=3600, ge=60)
    """Seconds without a request after which a session ends."""
    session_lifetime: int = Field(default=43200, ge=60)
    """Seconds after login after which a session ends, used or not."""
    secure_cookies: bool = True
    """Mark the session cookie ``Secure`` (sent over HTTPS only; browsers also send it to
    http://127.0.0.1 and http://localhost). Switch off only behind a proxy on plain HTTP."""
    tls_certificate: str = ""
    tls_key: str = ""
    """PEM files to serve HTTPS directly (both or neither)."""
    trusted_header: str = ""
    """A reverse proxy's header that carries the authenticated user (``X-Remote-User``);
    empty: no proxy login. Only requests from ``trusted_proxies`` may use it."""
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]
    header_role: Role = "viewer"
    """The role of a proxy-authenticated user the users file does not list."""
    patient_data_roles: list[Role] = ["viewer", "operator"]
    """Roles that see patient names, IDs, accession numbers and processing logs; the others
    see them masked and may search by UIDs only."""
    page_size: int = Field(default=50, ge=5, le=500)
    plot_hours: int = Field(default=6, ge=1, le=168)
    """Hours of received/delivered instances on the overview plot."""

    @model_validator(mode="after")
    def _both_tls(self) -> WebSettings:
        if bool(self.tls_certificate) != bool(self.tls_key):
            raise ValueError("set tls_certificate and tls_key together (or neither)")
        return self

    def users_path(self, config: Config) -> Path:
        if self.users_file:
            return Path(self.users_file)
        return config.folder("outgoing").parent / "web-users.json"


def web_settings(config: Config, name: str = "web") -> WebSettings:
    """The settings of the configured instance ``name`` (defaults when it is not configured)."""
    for inst in config.plugin_instances("service"):
        if inst.name == name and isinstance(inst.settings, WebSettings):
            return inst.settings
    for inst in config.plugin_instances("service"):
        if isinstance(inst.settings, WebSettings):
            return inst.settings
    return WebSettings()


__all__ = ["ROLES", "Role", "WebSettings", "web_settings"]
