"""The signature header: HMAC-SHA256 over the exact body bytes, so a receiver knows the sender.

The header's value is ``sha256=`` followed by the lowercase hex digest of
``HMAC(key=secret as UTF-8, message=body bytes, SHA-256)``, the form GitHub uses for its
``X-Hub-Signature-256``. A receiver computes the same over the raw request body (before any
JSON parsing) and compares in constant time; :func:`verify` does exactly that.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_PREFIX = "sha256="


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify(secret: str, body: bytes, header_value: str) -> bool:
    """Whether ``header_value`` is the signature of ``body`` with ``secret`` (constant time)."""
    return hmac.compare_digest(sign(secret, body).encode(), header_value.strip().encode())


__all__ = ["SIGNATURE_PREFIX", "sign", "verify"]
