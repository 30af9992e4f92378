"""Where a job is sent: the peer's address, AE titles, timeouts and TLS settings."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """Where to send: address, port, AE titles, and TLS settings if any."""

    host: str
    port: int
    called_aet: str
    calling_aet: str
    timeout: float
    max_pdu: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    #: Called when the association fails, to explain a TLS failure (see tls.probe_tls).
    tls_probe: Callable[[], str | None] | None = None
    #: Send C-STOREs with the lean sender (:mod:`.lean`); False: pynetdicom's ``send_c_store``.
    lean: bool = True
    #: Outstanding C-STOREs to propose (asynchronous operations window); 1 = not proposed.
    async_window: int = 1

    @property
    def label(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
