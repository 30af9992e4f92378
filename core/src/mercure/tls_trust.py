"""Which servers a client of the router trusts: the system's CAs plus the site's own.

Webhook and e-mail notifiers (and any plugin that connects to a site's server) take a
``ca_bundle`` setting as mercure does: a file or a folder of PEM certificates added to the
system's trusted CAs. Server names are checked.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A client TLS context trusting the system's CAs plus ``ca_bundle`` (file or folder)."""
    context = ssl.create_default_context()
    if ca_bundle:
        if Path(ca_bundle).is_dir():
            context.load_verify_locations(capath=ca_bundle)
        else:
            context.load_verify_locations(cafile=ca_bundle)
    return context


__all__ = ["client_context"]
