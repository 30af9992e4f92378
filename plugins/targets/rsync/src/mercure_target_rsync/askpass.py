"""Answers ssh's password and passphrase prompts without exposing the secret.

``sshpass -p`` puts the password on a command line (every user sees it in ``ps``), and
``sshpass -e`` or an askpass script that prints an environment variable put it in the
environment of processes (readable in ``/proc/<pid>/environ``). Instead, ssh is given
``SSH_ASKPASS`` = a tiny helper (:mod:`mercure_target_rsync.askpass_client`) that asks this
process over a Unix socket; the socket lives in a folder only the router's user can enter, and
each caller's user id is checked. The secret stays in the router's memory.

Which prompt gets which answer: the key passphrase only for ssh's own "Enter passphrase for
key '<our key file>'" prompt (a server cannot ask for it), the password for any prompt that
asks for a password (the server's identity was verified before ssh asks).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path

CLIENT = Path(__file__).with_name("askpass_client.py")
MAX_PROMPT = 4096


_SCRIPT_LOCK = threading.Lock()
_SCRIPT: Path | None = None


def shared_script() -> Path:
    """The helper script ssh runs, written once per process and reused by every send.

    Its text is the same for every job (the socket comes in ``MERCURE_ASKPASS_SOCKET``).
    Writing it per job would race: a script executed while another thread's fork still holds
    it open for writing fails with "Text file busy" (ETXTBSY).
    """
    global _SCRIPT
    with _SCRIPT_LOCK:
        if _SCRIPT is None or not _SCRIPT.exists():
            folder = Path(tempfile.mkdtemp(prefix="mercure-askpass-"))  # mode 0700
            script = folder / "askpass"
            script.write_text(
                f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S "
                f'{shlex.quote(str(CLIENT))} "$@"\n'
            )
            script.chmod(0o700)
            atexit.register(shutil.rmtree, folder, True)
            _SCRIPT = script
        return _SCRIPT


class AskpassServer:
    """A thread answering prompts on ``folder/askpass.sock`` until :meth:`close`."""

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None,
        passphrase: str | None,
        key_file: str | None,
    ) -> None:
        self.folder = folder
        self.password = password or None
        self.passphrase = passphrase or None
        self.key_file = key_file
        self.socket_path = folder / "askpass.sock"
        self.script = Path()
        self.answered: list[str] = []  # the kind of each answer given, for tests and logs
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> dict[str, str]:
        """Listen, write the helper script; return the environment ssh needs to use it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock
        self.script = shared_script()
        self._thread = threading.Thread(target=self._serve, name="rsync-askpass", daemon=True)
        self._thread.start()
        return {
            "SSH_ASKPASS": str(self.script),
            "SSH_ASKPASS_REQUIRE": "force",
            "MERCURE_ASKPASS_SOCKET": str(self.socket_path),
        }

    def answer(self, prompt: str) -> str | None:
        """The secret for ``prompt``, or None to refuse it."""
        text = prompt.strip().lower()
        if self.passphrase and self.key_file and text.startswith("enter passphrase for key "):
            quoted = prompt.strip()[len("enter passphrase for key ") :].rstrip(": ").strip("'\"")
            # OpenSSH shows at most the first 100 characters of the key's path.
            if quoted == self.key_file or (len(quoted) >= 100 and self.key_file.startswith(quoted)):
                self.answered.append("passphrase")
                return self.passphrase
            return None
        if self.password and "password" in text and "passphrase" not in text:
            self.answered.append("password")
            return self.password
        return None

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if hasattr(socket, "SO_PEERCRED"):
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                return
        data = b""
        while b"\n" not in data and len(data) < MAX_PROMPT:
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        reply = self.answer(data.split(b"\n", 1)[0].decode("utf-8", "replace"))
        if reply is not None:
            conn.sendall(reply.encode("utf-8"))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()
