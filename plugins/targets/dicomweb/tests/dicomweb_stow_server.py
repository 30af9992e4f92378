"""A DICOMweb test server for the answers a real archive gives but Orthanc cannot be made to.

It implements the parts of PS3.18 the target uses, with the standard's status codes and
bodies: STOW-RS ``POST {root}/studies`` (a ``multipart/related; type="application/dicom"``
body; the answer is a dataset in ``application/dicom+json`` with ReferencedSOPSequence,
FailedSOPSequence with FailureReason and WarningReason; 200 when every instance was stored
without warning, 202 when some failed or carry a warning, 409 when none was stored, 401 on
wrong credentials), QIDO-RS ``GET {root}/studies`` and WADO-RS
``GET {root}/studies/{study}/series/{series}/instances/{sop}`` (one ``application/dicom``
part, the instance as stored). Tests script the rest: per-instance failures and warnings,
instances left out of the answer, conflicts for instances it holds, canned answers (5xx, 429
with Retry-After, ...). It records each request and each TCP connection, and reads request
bodies to a temporary file in chunks, so it holds no whole request in memory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import mmap
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom

CONFLICT = 0x0111  # Duplicate SOP Instance


@dataclass
class Canned:
    """A scripted answer to the next STOW-RS request (nothing is stored)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class StowRequest:
    path: str
    headers: dict[str, str]
    uids: list[str]
    connection: int
    answered: int = 0


@dataclass
class Instance:
    sop_class: str
    study: str
    series: str
    digest: str
    data: bytes | None


class StowServer:
    """The server; its attributes are the script, changed by tests between requests."""

    def __init__(self, root: str = "/dicom-web", keep_bytes: bool = True) -> None:
        self.root = root.rstrip("/")
        self.keep_bytes = keep_bytes
        self.basic: tuple[str, str] | None = None
        self.token: str | None = None
        self.fail: dict[str, int] = {}
        self.fail_once: dict[str, int] = {}
        self.omit: set[str] = set()
        self.warn: dict[str, int] = {}
        self.on_duplicate = "store"  # or "conflict": FailedSOPSequence 0x0111, 409 if all
        self.max_batch: int | None = None  # more instances per request: 413, no body
        self.malformed: set[str] = set()  # a request holding one of these: 400, no body
        self.script: list[Canned] = []
        self.instances: dict[str, Instance] = {}
        self.requests: list[StowRequest] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{self.root}"

    def start(self) -> StowServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def stored_uids(self) -> set[str]:
        return set(self.instances)

    def sent_uids(self) -> list[str]:
        """Every SOP Instance UID in every STOW-RS request, in order (repeats included)."""
        return [uid for r in self.requests for uid in r.uids]

    # -- answers ---------------------------------------------------------------------------

    def authorized(self, headers: Any) -> bool:
        given = headers.get("Authorization", "")
        if self.basic is not None:
            user, password = self.basic
            return given == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if self.token is not None:
            return given == f"Bearer {self.token}"
        return True

    def store(self, parts: list[Part]) -> tuple[int, dict[str, Any]]:
        """Store what the script allows; the STOW-RS status and answer dataset."""
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        warned = False
        with self.lock:
            for uid, data, digest, sop_class, study, series in parts:
                reason = self.fail.get(uid) or self.fail_once.pop(uid, None)
                if reason is None and uid in self.instances and self.on_duplicate == "conflict":
                    reason = CONFLICT
                if reason is not None:
                    failed.append(_item(sop_class, uid, {"00081197": _us(reason)}))
                    continue
                if uid in self.omit:
                    continue
                self.instances[uid] = Instance(
                    sop_class, study, series, digest, data if self.keep_bytes else None
                )
                extra = {}
                if uid in self.warn:
                    extra["00081196"] = _us(self.warn[uid])
                    warned = True
                referenced.append(_item(sop_class, uid, extra))
        answer: dict[str, Any] = {
            "00081198": {"vr": "SQ", **({"Value": failed} if failed else {})},
            "00081199": {"vr": "SQ", **({"Value": referenced} if referenced else {})},
        }
        if not referenced and failed:
            return 409, answer
        if failed or warned or len(referenced) < len(parts):
            return 202, answer
        return 200, answer


def _us(code: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [code]}


def _item(sop_class: str, uid: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [sop_class]},
        "00081155": {"vr": "UI", "Value": [uid]},
        **extra,
    }


Part = tuple[str, "bytes | None", str, str, str, str]
"""(SOP Instance UID, bytes or None, SHA-256, SOP Class UID, study UID, series UID)."""


def _parts(fh: Any, size: int, boundary: bytes, keep: bool) -> list[Part]:
    """Each part of a multipart body in a file, read through mmap (not into memory)."""
    if size == 0:
        return []
    found = []
    with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mm:
        delimiter = b"--" + boundary
        at = mm.find(delimiter)
        while at >= 0:
            start = at + len(delimiter)
            if mm[start : start + 2] == b"--":
                break
            head_end = mm.find(b"\r\n\r\n", start)
            body_start = head_end + 4
            nxt = mm.find(b"\r\n" + delimiter, body_start)
            if head_end < 0 or nxt < 0:
                raise ValueError("truncated multipart body")
            head = pydicom.dcmread(
                io.BytesIO(mm[body_start : min(nxt, body_start + 65536)]),
                stop_before_pixels=True,
                force=True,
            )
            data = bytes(mm[body_start:nxt]) if keep else None
            digest = hashlib.sha256()
            for offset in range(body_start, nxt, 1 << 20):
                digest.update(mm[offset : min(nxt, offset + (1 << 20))])
            found.append(
                (
                    str(head.file_meta.MediaStorageSOPInstanceUID),
                    data,
                    digest.hexdigest(),
                    str(head.file_meta.MediaStorageSOPClassUID),
                    str(head.get("StudyInstanceUID", "")),
                    str(head.get("SeriesInstanceUID", "")),
                )
            )
            at = nxt + 2
    return found


def _handler(server: StowServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with server.lock:
                server.connections += 1
                self.connection_number = server.connections

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            body = json.dumps(data).encode()
            self._answer(status, body, {"Content-Type": "application/dicom+json"})

        def _unauthorized(self) -> None:
            self._answer(
                401,
                b'{"Message": "wrong user name or password"}',
                {"WWW-Authenticate": 'Basic realm="test"', "Content-Type": "application/json"},
            )

        def do_POST(self) -> None:
            length = self.headers.get("Content-Length")
            if length is None:
                self._answer(411, b"Content-Length required")
                return
            size = int(length)
            with tempfile.TemporaryFile() as spool:
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 256 * 1024))
                    if not chunk:
                        return
                    spool.write(chunk)
                    left -= len(chunk)
                spool.flush()
                if self.path.rstrip("/") != server.root + "/studies":
                    self._answer(404, b"not found")
                    return
                ctype = self.headers.get("Content-Type", "")
                match = re.search(r'boundary="?([^";]+)"?', ctype)
                if not ctype.startswith("multipart/related") or not match:
                    self._answer(415, b"multipart/related expected")
                    return
                parts = _parts(spool, size, match.group(1).encode(), server.keep_bytes)
            uids = [p[0] for p in parts]
            request = StowRequest(self.path, dict(self.headers), uids, self.connection_number)
            with server.lock:
                server.requests.append(request)
            if not server.authorized(self.headers):
                request.answered = 401
                self._unauthorized()
                return
            with server.lock:
                canned = server.script.pop(0) if server.script else None
            if canned is not None:
                if canned.delay:
                    time.sleep(canned.delay)
                request.answered = canned.status
                self._answer(canned.status, canned.body, canned.headers)
                return
            if server.max_batch is not None and len(parts) > server.max_batch:
                request.answered = 413
                self._answer(413, b"")
                return
            if server.malformed & set(uids):
                request.answered = 400
                self._answer(400, b"")
                return
            status, answer = server.store(parts)
            request.answered = status
            self._json(status, answer)

        def do_GET(self) -> None:
            if not server.authorized(self.headers):
                self._unauthorized()
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == server.root + "/studies":
                with server.lock:
                    studies = sorted({i.study for i in server.instances.values()})
                data = [{"0020000D": {"vr": "UI", "Value": [s]}} for s in studies[:1]]
                self._json(200, data)
                return
            match = re.fullmatch(
                re.escape(server.root) + r"/studies/([\d.]+)/series/([\d.]+)/instances/([\d.]+)",
                path,
            )
            if not match:
                self._answer(404, b"not found")
                return
            with server.lock:
                inst = server.instances.get(match.group(3))
            if inst is None or inst.data is None:
                self._answer(404, b"no such instance")
                return
            boundary = "wado-test-boundary"
            body = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + inst.data
                + f"\r\n--{boundary}--\r\n".encode()
            )
            self._answer(
                200,
                body,
                {
                    "Content-Type": (
                        f'multipart/related; type="application/dicom"; boundary={boundary}'
                    )
                },
            )

    return Handler
