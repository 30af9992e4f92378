"""Settings of a ``webhook`` notifier instance, checked when the configuration loads."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from mercure.plugin_settings import PluginSettings
from mercure.secrets import OptionalSecret, Secret
from mercure.tls_trust import client_context
from pydantic import Field, field_validator, model_validator

# RFC 9110 field names: a token of visible characters without separators.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers the notifier sets itself; ``headers`` may not replace them.
RESERVED_HEADERS = frozenset(
    {"content-length", "host", "transfer-encoding", "x-mercure-event", "x-mercure-notification-id"}
)


class WebhookSettings(PluginSettings):
    """How webhooks are sent; the URL and the payload come from each rule."""

    ca_bundle: str | None = None
    """CA certificates (a PEM file, or a folder prepared with ``c_rehash``) trusted for HTTPS
    in addition to the system's; mercure's ``webhook_certificate_location``."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds to connect, and to wait for each part of the answer."""
    headers: dict[str, Secret] = {}
    """Extra request headers, e.g. ``{"Authorization": "${env:HOOK_TOKEN}"}``."""
    secret: OptionalSecret = None
    """Key of the HMAC-SHA256 signature header; no header without it."""
    signature_header: str = "X-Mercure-Signature"
    """Name of the signature header."""

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_loads(cls, value: str | None) -> str | None:
        if not value:
            return None
        path = Path(value)
        if not path.exists():
            raise ValueError(f"CA bundle {value} does not exist")
        try:
            client_context(value)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"CA bundle {value} cannot be loaded as PEM certificates: {exc}"
            ) from None
        return value

    @field_validator("signature_header")
    @classmethod
    def _signature_header_name(cls, value: str) -> str:
        _check_header_name(value)
        if value.lower() in RESERVED_HEADERS or value.lower() == "content-type":
            raise ValueError(f"{value} is set by the notifier itself; choose another name")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, content in value.items():
            _check_header_name(name)
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by the notifier itself")
            if "\r" in content or "\n" in content:
                raise ValueError(f"the value of header {name} contains a line break")
        return value

    @model_validator(mode="after")
    def _signature_not_overridden(self) -> WebhookSettings:
        if self.secret is not None and not self.secret:
            raise ValueError("secret is empty; remove it to send no signature")
        names = {n.lower() for n in self.headers}
        if self.secret and self.signature_header.lower() in names:
            raise ValueError(
                f"headers sets {self.signature_header}, the signature header; remove it there"
            )
        return self


def _check_header_name(name: str) -> None:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")


__all__ = ["RESERVED_HEADERS", "WebhookSettings"]
