"""Serving the dashboard: uvicorn on a socket bound here (so a port in use fails at start,
with the reason), in a thread of its own, stopped cleanly on close."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

import uvicorn
from mercure.logs import get_logger
from mercure.services.runtime import Runtime

from mercure_web_dashboard.app import create_app
from mercure_web_dashboard.settings import WebSettings

log = get_logger("mercure.web")


class WebServer:
    """The dashboard of one runtime, listening on ``settings.host``/``port``."""

    def __init__(self, runtime: Runtime, settings: WebSettings, source: str = "") -> None:
        self.runtime = runtime
        self.settings = settings
        self.source = source
        self.sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.sock else self.settings.port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_certificate else "http"
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"the dashboard cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}; choose another port (plugins.services.web.port or "
                "mercure web --port)"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _config(self) -> uvicorn.Config:
        kwargs: dict[str, Any] = {}
        if self.settings.tls_certificate:
            # Checked here, so a wrong file is an error at start, not at the first request.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.settings.tls_certificate, self.settings.tls_key
            )
            kwargs.update(ssl_certfile=self.settings.tls_certificate,
                          ssl_keyfile=self.settings.tls_key)  # fmt: skip
        return uvicorn.Config(
            create_app(self.runtime, self.settings, self.source),
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            **kwargs,
        )

    def start(self) -> None:
        self.sock = self.bind()
        config = self._config()
        self.server = uvicorn.Server(config)
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            assert self.server is not None and self.sock is not None
            try:
                asyncio.run(self._serve(started))
            except BaseException as exc:  # reported to start() or logged
                failure.append(exc)
                started.set()

        self.thread = threading.Thread(target=serve, name="web", daemon=True)
        self.thread.start()
        started.wait(30)
        if failure:
            raise RuntimeError(f"the dashboard did not start: {failure[0]}")
        log.info("dashboard listening", url=self.url)

    async def _serve(self, started: threading.Event) -> None:
        assert self.server is not None and self.sock is not None
        task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not task.done():
            await asyncio.sleep(0.02)
        started.set()
        await task

    def run_forever(self) -> None:
        """For ``mercure web``: serve in the foreground until Ctrl-C or SIGTERM."""
        import signal

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(1.0):
                if self.thread is not None and not self.thread.is_alive():
                    raise RuntimeError("the dashboard's server stopped")
        finally:
            self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
            self.thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


__all__ = ["WebServer"]
