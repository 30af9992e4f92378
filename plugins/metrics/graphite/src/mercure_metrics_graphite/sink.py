"""The ``graphite`` metrics sink: plaintext lines over one TCP connection to carbon.

The connection is opened on the first batch and kept. Before each batch the sink checks that
carbon has not closed it (carbon never writes to a plaintext client, so a readable socket
means it went away); a closed or broken connection is dropped and the next batch connects
again, so metrics flow again as soon as carbon is back. Connecting has a short timeout
(``connect_timeout``, 2 s by default): while carbon is down each batch costs at most that, on
the sink's own thread, and is dropped and counted by the core's metrics hub. The pipeline never
waits for carbon.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.metrics import Metric, MetricsSink

from mercure_metrics_graphite.plaintext import Encoder
from mercure_metrics_graphite.settings import GraphiteSettings

log = get_logger("mercure.metrics.graphite")


class GraphiteSendError(RuntimeError):
    """A batch did not reach carbon; the message says why."""


class GraphiteSink(MetricsSink[GraphiteSettings]):
    """Writes batches of metrics to carbon's plaintext (line) receiver."""

    def __init__(self, name: str, settings: GraphiteSettings, context: PluginContext) -> None:
        super().__init__(name, settings, context)
        self.encoder = Encoder(
            context.appliance_name, settings.prefix, settings.tag_style, settings.counters
        )
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.connects = 0
        """How many connections were opened (a reconnect after carbon came back adds one)."""

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def start(self) -> None:
        # Nothing to open yet: carbon may still be starting; the first batch connects.
        log.info("sending metrics to Graphite", sink=self.name, address=self.address)

    def send(self, metrics: list[Metric]) -> None:
        lines = self.encoder.lines(metrics)
        if not lines:
            return
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            if self._closed:
                raise GraphiteSendError(f"Graphite sink '{self.name}' is closed")
            sock = self._connection()
            try:
                sock.sendall(payload)
            except OSError as exc:
                self._drop()
                raise GraphiteSendError(
                    f"sending {len(lines)} lines to carbon at {self.address} failed: "
                    f"{_reason(exc)}; reconnecting with the next batch"
                ) from exc

    def _connection(self) -> socket.socket:
        if self._sock is not None and _peer_closed(self._sock):
            log.info("carbon closed the connection; reconnecting", sink=self.name)
            self._drop()
        if self._sock is None:
            s = self.settings
            try:
                sock = socket.create_connection((s.host, s.port), timeout=s.connect_timeout)
            except OSError as exc:
                raise GraphiteSendError(
                    f"cannot connect to carbon at {self.address}: {_reason(exc)}"
                ) from exc
            sock.settimeout(s.send_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self.connects += 1
            if self.connects > 1:
                log.info("connected to carbon again", sink=self.name, address=self.address)
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)  # carbon reads up to here, then closes
            self._drop()


def _peer_closed(sock: socket.socket) -> bool:
    """True if carbon closed or reset the connection (it never sends anything itself)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return exc.strerror or str(exc) or exc.__class__.__name__


__all__ = ["GraphiteSendError", "GraphiteSink"]
