"""A real Docker engine for the tests, and a mercure module image built on the spot.

* ``docker_engine``: Debian's ``dockerd`` started once per session with its own socket, data
  root and exec root under a fresh folder, no bridge and no iptables, stopped by its PID at
  the end. The tests skip when ``dockerd`` is not installed or the tests do not run as root
  (``dockerd`` needs it); a ``dockerd`` that is installed but does not start fails them.
* ``module_image``: no image registry is reachable, so the image is imported from a root file
  system made here: Debian's static busybox and ``module.sh`` (next to this file), a mercure
  processing module written in busybox's shell.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from docker_support import DockerEngine

HERE = Path(__file__).parent
BUSYBOX = Path("/bin/busybox")
MODULE_SCRIPT = HERE / "module.sh"
IMAGE = "mercure-test/busybox-module:1"
APPLETS = (
    "sh",
    "cat",
    "cp",
    "chmod",
    "chown",
    "date",
    "echo",
    "env",
    "grep",
    "head",
    "hostname",
    "id",
    "kill",
    "ls",
    "mkdir",
    "nc",
    "printf",
    "ps",
    "rm",
    "sed",
    "sleep",
    "tail",
    "test",
    "touch",
    "tr",
    "wc",
    "wget",
    "yes",
    "true",
    "false",
)


def _dockerd() -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which("dockerd", path=path)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    exe = _dockerd()
    if exe is None:
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("dockerd needs root; these tests start their own engine")
    # A short path: the socket's name must fit in a unix socket address (108 bytes).
    folder = Path(tempfile.mkdtemp(prefix="mdk", dir="/tmp"))
    sock = folder / "docker.sock"
    log_path = folder / "dockerd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                exe,
                "--host",
                f"unix://{sock}",
                "--data-root",
                str(folder / "root"),
                "--exec-root",
                str(folder / "exec"),
                "--pidfile",
                str(folder / "dockerd.pid"),
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    engine = DockerEngine(f"unix://{sock}", folder, proc.pid)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dockerd exited with {proc.returncode}:\n{log_path.read_text()}")
            if sock.exists():
                with contextlib.suppress(Exception):
                    client = engine.client()
                    client.ping()
                    client.close()
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd did not answer within 60 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield engine
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _rootfs_tar(files: dict[str, bytes] | None = None) -> bytes:
    """A root file system: static busybox, its applets, ``/module.sh``, a world-writable /tmp
    and ``files`` (path -> content; their folders must be in the list below)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folders = (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755), ("etc/monai", 0o755))
        for folder, mode in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(passwd), 0o644
        tar.addfile(info, io.BytesIO(passwd))
        tar.add(str(MODULE_SCRIPT), "module.sh")
        for name, content in (files or {}).items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _import(engine: DockerEngine, image: str, rootfs: bytes, changes: list[str]) -> str:
    client = engine.client()
    try:
        repository, tag = image.rsplit(":", 1)
        client.api.import_image_from_data(rootfs, repository=repository, tag=tag, changes=changes)
        client.images.get(image)
    finally:
        client.close()
    return image


@pytest.fixture(scope="session")
def module_image(docker_engine: DockerEngine) -> str:
    """The test module's image on the engine (``CMD ["/bin/sh", "/module.sh"]``)."""
    if not BUSYBOX.exists():
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    return _import(
        docker_engine, IMAGE, _rootfs_tar(), ['CMD ["/bin/sh", "/module.sh"]', "ENV PATH=/bin"]
    )


@pytest.fixture(scope="session")
def monai_image(docker_engine: DockerEngine, module_image: str) -> str:
    """A MONAI Application Package: its manifest names the command; its own would fail."""
    manifest = json.dumps({"command": ["/bin/sh", "/module.sh"]}).encode()
    return _import(
        docker_engine,
        "mercure-test/monai-map:1",
        _rootfs_tar({"etc/monai/app.json": manifest}),
        ['ENTRYPOINT ["/bin/false"]', 'CMD ["/bin/false"]', "ENV PATH=/bin"],
    )


@pytest.fixture
def docker_client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    client = docker_engine.client()
    yield client
    client.close()
