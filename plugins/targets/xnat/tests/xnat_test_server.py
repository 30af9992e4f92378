"""A stand-in for XNAT, which cannot be installed here: its documented endpoints the plugin calls.

Implemented as XNAT documents them (XNAT API: "User Session Management API" and "Image
Session Import Service API"), with XNAT's status codes and bodies:

* ``POST /data/JSESSION`` (and ``GET``) with HTTP basic credentials: 200 and the new session
  id (32 hex digits) as ``text/plain``, also set as cookie ``JSESSIONID``; wrong credentials:
  401 with an HTML page and ``WWW-Authenticate: Basic realm="XNAT"``.
* ``DELETE /data/JSESSION``: ends the session of the ``JSESSIONID`` cookie; 200.
* ``GET /data/auth`` with basic credentials: 200 or 401.
* ``POST /data/services/import?inbody=true&PROJECT_ID=..&SUBJECT_ID=..&EXPT_LABEL=..`` with
  an ``application/zip`` body, ``overwrite`` ``none`` (XNAT's default) / ``append`` /
  ``delete`` and ``import-handler`` ``DICOM-zip``: unpacks the zip and files the instances
  under project / subject / session; 200 with the session's URI
  (``/data/archive/projects/P/subjects/S/experiments/E``) as ``text/plain``. As XNAT's
  DICOM-zip importer does, a member it cannot parse gives 400 while the members before it
  stay: a partial import. An unknown project gives 404, an existing
  session with ``overwrite=none`` 409, a request without a session or credentials 401.

Tests add faults: canned answers for the next imports (a 500 with XNAT's error page), a delay
(a slow server), expiring every session. Each request is recorded; request bodies are read
to a temporary file in chunks, never held whole in memory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import tempfile
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom


@dataclass
class Fault:
    """A canned answer to the next import (after its body was read), or only a delay."""

    status: int = 0
    body: str = ""
    delay: float = 0.0
    process: bool = False  # import the upload anyway before answering (a slow server)


@dataclass
class Upload:
    params: dict[str, str]
    members: list[str]
    status: int = 0
    cookie: str | None = None


@dataclass
class Server:
    users: dict[str, str] = field(default_factory=lambda: {"router": "s3cret"})
    projects: set[str] = field(default_factory=lambda: {"PROJ1"})
    #: project -> subject -> session -> SOP Instance UID -> member bytes
    archive: dict[str, dict[str, dict[str, dict[str, bytes]]]] = field(default_factory=dict)
    prearchive: dict[str, bytes] = field(default_factory=dict)
    sessions: dict[str, str] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    #: Member names the importer cannot parse (as XNAT with a file it does not understand).
    unparseable: set[str] = field(default_factory=set)
    #: False: keep each instance's SHA-256 instead of its bytes (for large uploads).
    keep_bytes: bool = True
    uploads: list[Upload] = field(default_factory=list)
    logins: int = 0
    logouts: int = 0
    auth_checks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def session_files(self, project: str, subject: str, session: str) -> dict[str, bytes]:
        return self.archive.get(project, {}).get(subject, {}).get(session, {})

    def expire_sessions(self) -> None:
        with self.lock:
            self.sessions.clear()


ERROR_PAGE = (
    "<html><head><title>Apache Tomcat - Error report</title></head><body>"
    "<h1>HTTP Status {status} - {message}</h1></body></html>"
)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            for key, value in (headers or {"Content-Type": "text/plain"}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            page = ERROR_PAGE.format(status=status, message=message)
            headers = {"Content-Type": "text/html"}
            if status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="XNAT"'
            self._send(status, page, headers)

        def _basic_user(self) -> str | None:
            header = self.headers.get("Authorization", "")
            if not header.startswith("Basic "):
                return None
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return user if server.users.get(user) == password else None

        def _cookie(self) -> str | None:
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == "JSESSIONID":
                    return value
            return None

        def _session_user(self) -> str | None:
            with server.lock:
                return server.sessions.get(self._cookie() or "")

        def _read_body(self, spool: Any) -> None:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 256 * 1024))
                if not chunk:
                    break
                spool.write(chunk)
                left -= len(chunk)

        def _path(self) -> tuple[str, dict[str, str]]:
            parts = urllib.parse.urlsplit(self.path)
            return parts.path.rstrip("/"), dict(urllib.parse.parse_qsl(parts.query))

        def _login(self) -> None:
            user = self._basic_user()
            if user is None:
                self._error(401, "Login attempt failed. Please try again.")
                return
            session = secrets.token_hex(16).upper()
            with server.lock:
                server.sessions[session] = user
                server.logins += 1
            self._send(
                200, session, {"Content-Type": "text/plain", "Set-Cookie": f"JSESSIONID={session}"}
            )

        def do_GET(self) -> None:
            path, _ = self._path()
            if path == "/data/JSESSION":
                self._login()
            elif path == "/data/auth":
                with server.lock:
                    server.auth_checks += 1
                if self._basic_user() is None:
                    self._error(401, "Unauthorized")
                else:
                    self._send(200, "")
            else:
                self._error(404, "Not Found")

        def do_DELETE(self) -> None:
            path, _ = self._path()
            if path != "/data/JSESSION":
                self._error(404, "Not Found")
                return
            with server.lock:
                server.sessions.pop(self._cookie() or "", None)
                server.logouts += 1
            self._send(200, "")

        def do_POST(self) -> None:
            path, params = self._path()
            with tempfile.TemporaryFile() as spool:
                self._read_body(spool)
                if path == "/data/JSESSION":
                    self._login()
                    return
                if path != "/data/services/import":
                    self._error(404, "Not Found")
                    return
                if self._session_user() is None and self._basic_user() is None:
                    self._error(401, "Unauthorized")
                    return
                self._import(spool, params)

        def _import(self, spool: Any, params: dict[str, str]) -> None:
            upload = Upload(params, [], cookie=self._cookie())
            with server.lock:
                server.uploads.append(upload)
                fault = server.faults.pop(0) if server.faults else None
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.status and not fault.process:
                upload.status = fault.status
                self._error(fault.status, fault.body or "Internal Server Error")
                return
            status, body = self._file_upload(spool, params, upload)
            upload.status = status
            if status == 200:
                self._send(200, body + "\r\n")
            else:
                self._error(status, body)

        def _file_upload(
            self, spool: Any, params: dict[str, str], upload: Upload
        ) -> tuple[int, str]:
            if params.get("inbody") != "true":
                return 400, "The import service requires inbody=true for a request body"
            if self.headers.get("Content-Type", "").split(";")[0] != "application/zip":
                return 415, "Unsupported Media Type: expected application/zip"
            project = params.get("PROJECT_ID", "")
            subject, session = params.get("SUBJECT_ID", ""), params.get("EXPT_LABEL", "")
            if project not in server.projects:
                return 404, f"No project with ID {project} found"
            if not subject or not session:
                return 400, "SUBJECT_ID and EXPT_LABEL are required"
            overwrite = params.get("overwrite", "none")
            spool.seek(0)
            try:
                archive = zipfile.ZipFile(spool)
            except zipfile.BadZipFile:
                return 400, "The uploaded file is not a zip archive"
            with server.lock:
                sessions = server.archive.setdefault(project, {}).setdefault(subject, {})
                if session in sessions and overwrite == "none":
                    return 409, f"Session {session} already exists; use overwrite=append"
                if overwrite == "delete":
                    sessions.pop(session, None)
                files = sessions.setdefault(session, {})
            for member in archive.infolist():
                data = archive.read(member)
                upload.members.append(member.filename)
                try:
                    if member.filename in server.unparseable:
                        raise ValueError("not understood")
                    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                    uid = str(ds.SOPInstanceUID)
                except Exception:
                    # As DICOM-zip does: 400, the files before this one are kept.
                    return 400, f"Unable to parse {member.filename} as DICOM"
                if not server.keep_bytes:
                    data = hashlib.sha256(data).hexdigest().encode()
                with server.lock:
                    held = files.get(uid)
                    if held is not None and held != data and overwrite == "append":
                        return 409, f"{member.filename} conflicts with a file the session holds"
                    files[uid] = data
            return 200, (
                f"/data/archive/projects/{project}/subjects/{subject}/experiments/{session}"
            )

    return Handler


class XnatTestServer:
    """:class:`Server` behind a threading HTTP server on a free loopback port."""

    def __init__(self) -> None:
        self.state = Server()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> XnatTestServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
