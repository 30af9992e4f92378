"""An HTTP test server that stands in for mercure's bookkeeper (none can be installed here).

It implements the bookkeeper endpoints the plugin calls, as mercure's bookkeeper documents and
serves them: token authentication (``Authorization: Token <key>``, 401 otherwise), form bodies
for ``mercure-event``, ``webgui-event``, ``register-dicom``, ``register-series``, ``task-event``
and ``processor-logs``, JSON bodies for ``register-task``, ``update-task``,
``store-processor-output``, ``test-begin`` and ``test-end``, the answer ``{"ok": ""}`` with
200, and ``GET /test``. ``register-task`` and ``update-task`` need ``id`` (and
``register-task`` ``series_uid``), as the real one reads them. Every accepted request is
recorded; :meth:`down` and :meth:`up` stop and restart the server on the same port.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

FORM = {"mercure-event", "webgui-event", "register-dicom", "register-series", "task-event",
        "processor-logs"}  # fmt: skip
JSON = {"register-task", "update-task", "store-processor-output", "test-begin", "test-end"}


@dataclass
class Received:
    endpoint: str
    payload: dict[str, Any]
    token: str
    content_type: str


@dataclass
class BookkeeperServer:
    api_key: str
    port: int = 0
    received: list[Received] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    reject: dict[str, int] = field(default_factory=dict)
    """endpoint -> status to answer instead (to play a bookkeeper that rejects a request)."""
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def up(self) -> BookkeeperServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/test":
                    self._answer(200, {"ok": ""})
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self) -> None:
                endpoint = self.path.lstrip("/")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                auth = self.headers.get("Authorization", "")
                token = auth[len("Token ") :] if auth.startswith("Token ") else ""
                if token != owner.api_key:
                    with owner._lock:
                        owner.refused.append((endpoint, 401))
                    self.send_response(401)
                    self.end_headers()
                    self.wfile.write(b"Invalid token")
                    return
                if endpoint not in FORM | JSON:
                    self._answer(404, {"error": "not found"})
                    return
                if endpoint in owner.reject:
                    with owner._lock:
                        owner.refused.append((endpoint, owner.reject[endpoint]))
                    self._answer(owner.reject[endpoint], {"error": "rejected by the test"})
                    return
                ctype = self.headers.get("Content-Type", "")
                try:
                    if endpoint in FORM:
                        if "application/x-www-form-urlencoded" not in ctype:
                            raise ValueError(f"form body expected, got {ctype}")
                        payload: dict[str, Any] = dict(
                            parse_qsl(raw.decode(), keep_blank_values=True)
                        )
                    else:
                        payload = json.loads(raw)
                        if not isinstance(payload, dict):
                            raise ValueError("JSON object expected")
                        if endpoint in ("register-task", "update-task"):
                            payload["id"]
                        if endpoint == "register-task":
                            payload["series_uid"]
                except (ValueError, KeyError) as exc:
                    self._answer(500, {"error": f"Internal server error: {exc}"})
                    return
                with owner._lock:
                    owner.received.append(Received(endpoint, payload, token, ctype))
                self._answer(200, {"ok": ""})

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def of(self, endpoint: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r.payload for r in self.received if r.endpoint == endpoint]

    def task_events(self, task_id: str) -> list[str]:
        return [p["event"] for p in self.of("task-event") if p.get("task_id") == task_id]
