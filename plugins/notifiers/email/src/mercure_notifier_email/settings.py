"""Settings of an ``email`` notifier instance, checked when the configuration loads."""

from __future__ import annotations

import ssl
from email.utils import parseaddr
from pathlib import Path

from mercure.plugin_settings import PluginSettings
from mercure.secrets import OptionalSecret
from mercure.tls_trust import client_context
from pydantic import Field, field_validator, model_validator


class EmailSettings(PluginSettings):
    """The SMTP server and sender; recipients, subject and body come from each rule."""

    from_address: str = "mercure@mercure.mercure"
    """Sender (``From`` and the envelope sender); mercure's ``email_notification_from``.
    ``Name <address>`` is allowed."""
    smtp_host: str = "localhost"
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    """Default 25, or 465 with ``implicit_tls``."""
    starttls: bool = False
    """Upgrade the connection with STARTTLS before anything else (usually port 587)."""
    implicit_tls: bool = False
    """TLS from the first byte (SMTPS, usually port 465)."""
    ca_bundle: str | None = None
    """CA certificates (PEM file or ``c_rehash`` folder) trusted in addition to the system's."""
    username: str = ""
    password: OptionalSecret = None
    timeout: float = Field(default=30.0, gt=0)
    """Seconds to connect and to wait for each answer of the server."""

    @property
    def port(self) -> int:
        if self.smtp_port is not None:
            return self.smtp_port
        return 465 if self.implicit_tls else 25

    @property
    def envelope_from(self) -> str:
        return parseaddr(self.from_address)[1]

    @field_validator("from_address")
    @classmethod
    def _an_address(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("contains a line break")
        _, address = parseaddr(value)
        if "@" not in address:
            raise ValueError(f"{value!r} is not an e-mail address (name@domain)")
        return value

    @field_validator("smtp_host")
    @classmethod
    def _a_host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the SMTP server (mercure used localhost)")
        return value.strip()

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_loads(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not Path(value).exists():
            raise ValueError(f"CA bundle {value} does not exist")
        try:
            client_context(value)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"CA bundle {value} cannot be loaded as PEM certificates: {exc}"
            ) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EmailSettings:
        if self.starttls and self.implicit_tls:
            raise ValueError("starttls and implicit_tls exclude each other; choose one")
        if self.ca_bundle and not (self.starttls or self.implicit_tls):
            raise ValueError("ca_bundle is used only with starttls or implicit_tls")
        if self.username and not self.password:
            raise ValueError("username is set but password is not")
        if self.password and not self.username:
            raise ValueError("password is set but username is not")
        return self


__all__ = ["EmailSettings"]
