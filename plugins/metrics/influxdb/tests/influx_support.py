"""Peers of the InfluxDB sink's tests, and what the tests share.

* :class:`Influxd`: a running InfluxDB 1.x (Debian's ``influxdb``) and InfluxQL queries.
* :class:`InfluxV2Server`: an HTTP test server for the v2 write API (no InfluxDB 2.x installs
  here).
* :func:`parse_line`: a line-protocol parser, so the tests check what was sent, not how.
* :func:`make_sink`: a sink with validated settings.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from mercure.lifecycle import PluginContext
from mercure.testing import PeerProcess
from mercure_metrics_influxdb import InfluxDBSettings, InfluxDBSink

INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
ADMIN = ("admin", "s3cret-admin")


# -- line protocol, parsed ---------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, Any]
    timestamp: int | None


def _split(text: str, seps: str, *, quotes: bool = False) -> tuple[str, str, str]:
    """Up to the first unescaped (and, with ``quotes``, unquoted) separator: (head, sep, rest)."""
    i, quoted = 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            i += 2
            continue
        if quotes and ch == '"':
            quoted = not quoted
        elif not quoted and ch in seps:
            return text[:i], ch, text[i + 1 :]
        i += 1
    return text, "", ""


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ',= "\\':
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _field_value(raw: str) -> Any:
    if raw.startswith('"'):
        return _unescape(raw[1:-1])
    if raw.endswith("i"):
        return int(raw[:-1])
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    return float(raw)


def parse_line(line: str) -> Point:
    """One line of InfluxDB line protocol; ``ValueError`` if it is not valid."""
    key, sep, rest = _split(line, " ")
    if not sep:
        raise ValueError(f"no field set in {line!r}")
    measurement, _, tag_text = _split(key, ",")
    tags: dict[str, str] = {}
    while tag_text:
        pair, _, tag_text = _split(tag_text, ",")
        k, eq, v = _split(pair, "=")
        if not eq or not k or not v:
            raise ValueError(f"bad tag {pair!r} in {line!r}")
        tags[_unescape(k)] = _unescape(v)
    field_text, _, ts = _split(rest, " ", quotes=True)
    fields: dict[str, Any] = {}
    while field_text:
        pair, _, field_text = _split(field_text, ",", quotes=True)
        k, eq, v = _split(pair, "=")
        if not eq or not k or not v:
            raise ValueError(f"bad field {pair!r} in {line!r}")
        fields[_unescape(k)] = _field_value(v)
    if not measurement or not fields:
        raise ValueError(f"no measurement or no field in {line!r}")
    return Point(_unescape(measurement), tags, fields, int(ts) if ts.strip() else None)


# -- InfluxDB 1.x --------------------------------------------------------------------------------


@dataclass
class Influxd:
    """A running InfluxDB 1.x; :meth:`query` runs InfluxQL as the admin user."""

    url: str
    process: PeerProcess

    def query(self, q: str, db: str = "") -> list[dict[str, Any]]:
        params = {"q": q, **({"db": db} if db else {})}
        r = httpx.post(f"{self.url}/query", params=params, auth=ADMIN, timeout=10)
        r.raise_for_status()
        results: list[dict[str, Any]] = r.json()["results"]
        for result in results:
            if "error" in result:
                raise RuntimeError(f"InfluxQL {q!r}: {result['error']}")
        return results

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        """The rows of a SELECT as dicts (``time`` as epoch milliseconds)."""
        params = {"q": q, "db": db, "epoch": "ms"}
        r = httpx.get(f"{self.url}/query", params=params, auth=ADMIN, timeout=10)
        r.raise_for_status()
        found = []
        for result in r.json()["results"]:
            if "error" in result:
                raise RuntimeError(f"InfluxQL {q!r}: {result['error']}")
            for series in result.get("series", []):
                for values in series["values"]:
                    found.append(
                        {
                            **series.get("tags", {}),
                            **dict(zip(series["columns"], values, strict=True)),
                        }
                    )
        return found

    def new_database(self) -> str:
        name = "db_" + uuid.uuid4().hex[:10]
        self.query(f'CREATE DATABASE "{name}"')
        return name


def influxd_config(root: Path, http_port: int, rpc_port: int) -> Path:
    path = root / "influxdb.conf"
    path.write_text(
        f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root / "meta"}"
[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = true
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""
    )
    return path


# -- InfluxDB 2.x write API, as a test server ---------------------------------------------------


@dataclass
class Write:
    """One accepted write request."""

    org: str
    bucket: str
    precision: str
    gzip: bool
    connection: tuple[str, int]
    points: list[Point]


@dataclass
class InfluxV2Server:
    """Stands in for InfluxDB 2.x's write endpoint, which does not install here.

    It implements ``POST /api/v2/write?org=&bucket=&precision=`` as InfluxDB 2.x documents it:
    ``Authorization: Token <token>`` is required (401 ``{"code": "unauthorized", "message":
    "unauthorized access"}`` otherwise), an unknown org or bucket is 404 (``{"code": "not
    found", "message": "bucket \\"<name>\\" not found"}``), the body may be gzipped
    (``Content-Encoding: gzip``), every line must be valid line protocol (400 ``{"code":
    "invalid", "message": ...}`` otherwise), and success is 204 without a body. HTTP/1.1 with
    keep-alive, like InfluxDB, so tests can see how many connections a client opened.
    """

    token: str = "t0ken"
    org: str = "radiology"
    bucket: str = "mercure"
    port: int = 0
    delay: float = 0.0
    tls: ssl.SSLContext | None = None
    """Serve https with this server context (a test CA's certificate)."""
    writes: list[Write] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _open: set[socket.socket] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def points(self) -> list[Point]:
        return [p for w in list(self.writes) for p in w.points]

    @property
    def connections(self) -> set[tuple[str, int]]:
        return {w.connection for w in list(self.writes)}

    def start(self) -> InfluxV2Server:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, status: int, body: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                if status != 204:  # recorded before the answer, which the test may check at once
                    server.refused.append(status)
                try:
                    self.send_response(status)
                    if body is not None:
                        self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout) or the server is stopping
                    self.close_connection = True
                    return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if server.delay:
                    time.sleep(server.delay)
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if url.path != "/api/v2/write":
                    return self.answer(404, {"code": "not found", "message": "path not found"})
                if self.headers.get("Authorization") != f"Token {server.token}":
                    return self.answer(
                        401, {"code": "unauthorized", "message": "unauthorized access"}
                    )
                if query.get("org") != server.org:
                    org = query.get("org", "")
                    return self.answer(
                        404,
                        {"code": "not found", "message": f'organization name "{org}" not found'},
                    )
                if query.get("bucket") != server.bucket:
                    bucket = query.get("bucket", "")
                    return self.answer(
                        404, {"code": "not found", "message": f'bucket "{bucket}" not found'}
                    )
                zipped = self.headers.get("Content-Encoding", "") == "gzip"
                try:
                    text = (gzip.decompress(body) if zipped else body).decode("utf-8")
                    points = [parse_line(line) for line in text.splitlines() if line.strip()]
                except (ValueError, OSError, UnicodeDecodeError) as exc:
                    return self.answer(
                        400, {"code": "invalid", "message": f"unable to parse: {exc}"}
                    )
                server.writes.append(
                    Write(
                        query["org"],
                        query["bucket"],
                        query.get("precision", "ns"),
                        zipped,
                        self.client_address[:2],
                        points,
                    )
                )
                self.answer(204)

            def setup(self) -> None:
                super().setup()
                server._open.add(self.connection)

            def finish(self) -> None:
                server._open.discard(self.connection)
                super().finish()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for sock in list(self._open):  # kept-alive connections end too, as when a server stops
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)


def make_sink(name: str = "influxdb", appliance: str = "master", **settings: Any) -> InfluxDBSink:
    """A sink with these settings (validated as the configuration would be), not yet started."""
    return InfluxDBSink(
        name,
        InfluxDBSettings.model_validate(settings),
        PluginContext("metrics_sink", name, appliance),
    )
