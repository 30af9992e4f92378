"""A real OpenSSH server for the tests of SSH-based targets (SFTP, rsync over ssh, ...).

:class:`SSHAccount` is a local user made for the test session (it needs root: ``useradd`` and
``chpasswd``) that can log in with a password, with a key, or with a passphrase-protected key.
:class:`OpenSSHServer` runs Debian's ``/usr/sbin/sshd`` on a free loopback port with its own
configuration, host key and ``authorized_keys``, and can be killed (with every session it
serves, as a crash would) and started again on the same port with the same or a new host key.
The fixtures ``ssh_account`` and ``openssh_server`` in :mod:`mercure.testing` hand them out.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SSHD = Path(os.environ.get("MERCURE_SSHD", "/usr/sbin/sshd"))
SSH_KEYGEN = Path("/usr/bin/ssh-keygen")


def _need(program: Path, package: str) -> None:
    if not program.exists():
        pytest.skip(f"{program} is missing (apt-get install {package})")


def fingerprint_of(public_key_line: str) -> str:
    """``SHA256:...`` of an OpenSSH public key line (``type base64 [comment]``), as ssh shows it."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def make_keypair(path: Path, passphrase: str = "", key_type: str = "ed25519") -> Path:
    """An OpenSSH key pair at ``path`` and ``path.pub`` (``ssh-keygen``); returns ``path``."""
    _need(SSH_KEYGEN, "openssh-client")
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-t", key_type, "-N", passphrase, "-C", "mercure-test", "-f", path],
        check=True,
        capture_output=True,
    )
    return path


@dataclass(frozen=True)
class SSHAccount:
    """A local user for SSH tests, its credentials and a home it may write to."""

    user: str
    uid: int
    gid: int
    home: Path
    password: str
    key: Path
    encrypted_key: Path
    passphrase: str
    authorized_keys: Path

    def folder(self, name: str, *, owned: bool = True) -> Path:
        """A new folder in the account's home; owned by the account unless ``owned=False``."""
        path = self.home / name
        path.mkdir(parents=True)
        if owned:
            os.chown(path, self.uid, self.gid)
        path.chmod(0o755)
        return path


def create_ssh_account(base: Path) -> SSHAccount:
    """Create a throw-away local user (root only) with a password and two authorized keys."""
    if os.geteuid() != 0:
        pytest.skip("creating a local user for the sshd tests needs root")
    for tool in ("/usr/sbin/useradd", "/usr/sbin/chpasswd", "/usr/sbin/userdel"):
        _need(Path(tool), "passwd")
    user = f"mtest{secrets.token_hex(4)}"
    home = base / "home"
    _user_tool(
        ["/usr/sbin/useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
         "--user-group", user]
    )  # fmt: skip
    password = "pw-" + secrets.token_urlsafe(12)
    try:
        _user_tool(["/usr/sbin/chpasswd"], f"{user}:{password}\n")
        entry = pwd.getpwnam(user)
    except BaseException:
        _user_tool(["/usr/sbin/userdel", user], check=False)
        raise
    home.mkdir(parents=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    home.chmod(0o755)
    keys = base / "client-keys"
    keys.mkdir()
    passphrase = "pp-" + secrets.token_urlsafe(12)
    key = make_keypair(keys / "id_plain")
    encrypted = make_keypair(keys / "id_encrypted", passphrase)
    authorized = base / "authorized_keys"
    authorized.write_text(
        (keys / "id_plain.pub").read_text() + (keys / "id_encrypted.pub").read_text()
    )
    authorized.chmod(0o644)
    return SSHAccount(
        user, entry.pw_uid, entry.pw_gid, home, password, key, encrypted, passphrase, authorized
    )


def delete_ssh_account(account: SSHAccount) -> None:
    """Remove the user again (its files are removed with the session's folders)."""
    _user_tool(["/usr/sbin/userdel", account.user], check=False)


def _user_tool(argv: list[str], stdin: str | None = None, *, check: bool = True) -> None:
    """Run useradd & co.; another process editing /etc/passwd at that moment is retried."""
    for attempt in range(5):
        done = subprocess.run(
            argv, input=stdin.encode() if stdin else None, capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.2 * (attempt + 1))
    if check:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()}")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux ``/proc``): the sessions an sshd listener forked."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        kids = [child for child, parent in parents.items() if parent == current]
        found.extend(kids)
        todo.extend(kids)
    return found


@dataclass
class OpenSSHServer:
    """OpenSSH's sshd on 127.0.0.1 with a configuration, host key and logs in ``folder``.

    Password and public-key logins for ``account`` only, the SFTP subsystem in-process
    (``internal-sftp``), no PAM. ``log`` holds sshd's own messages for a failing test.
    """

    account: SSHAccount
    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_config: list[str] = field(default_factory=list)

    @property
    def host_key(self) -> Path:
        return self.folder / "ssh_host_ed25519_key"

    @property
    def host_public_key(self) -> str:
        """The host key as ``type base64`` (what a known_hosts line holds after the name)."""
        return " ".join(
            self.host_key.with_name(self.host_key.name + ".pub").read_text().split()[:2]
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.host_public_key)

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public_key}\n"

    def write_known_hosts(self, path: Path) -> Path:
        """A known_hosts file that trusts this server (and nothing else)."""
        path.write_text(self.known_hosts_line)
        return path

    @property
    def log(self) -> str:
        path = self.folder / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> OpenSSHServer:
        _need(SSHD, "openssh-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        if not self.host_key.exists():
            make_keypair(self.host_key)
        if not self.port:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = int(sock.getsockname()[1])
        config = self.folder / "sshd_config"
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.folder / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.account.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            f"AllowUsers {self.account.user}",
            "Subsystem sftp internal-sftp",
            "MaxStartups 200",
            "MaxSessions 100",
            "MaxAuthTries 6",
            "LoginGraceTime 30",
            "PrintMotd no",
            "UseDNS no",
            *self.extra_config,
        ]
        config.write_text("\n".join(lines) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        log = open(self.folder / "sshd.log", "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited early with {self.proc.returncode}: {self.log}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on port {self.port} within 20 s: {self.log}")

    def sessions(self) -> list[int]:
        """PIDs of the processes serving connections now (children of the listener)."""
        return _children(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def kill(self) -> None:
        """SIGKILL the listener and every session: what a crash of the server looks like."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the listener and its sessions (terminate, then kill)."""
        if self.proc is None:
            return
        sessions = _children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def restart(self, *, new_host_key: bool = False) -> OpenSSHServer:
        """Start again on the same port; with ``new_host_key`` the server's identity changes."""
        self.stop()
        if new_host_key:
            make_keypair(self.host_key)
        return self.start()


def ssh_base_folder() -> Path:
    """A folder the test user can reach: pytest's own tmp folders are private to root."""
    base = Path(tempfile.mkdtemp(prefix="mercure-ssh-"))
    base.chmod(0o755)
    return base


def remove_base_folder(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)


def processes_containing(needle: str | bytes) -> list[str]:
    """Processes whose command line or environment contains ``needle`` (Linux ``/proc``).

    For tests that check that no password or key material is visible in the process list.
    Returns ``"<pid> <what>: <command line>"`` for each hit.
    """
    data = needle.encode() if isinstance(needle, str) else needle
    hits: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                blob = (entry / part).read_bytes()
            except OSError:
                continue
            if data in blob:
                try:
                    cmd = (
                        (entry / "cmdline")
                        .read_bytes()
                        .replace(b"\0", b" ")
                        .decode(errors="replace")
                    )
                except OSError:
                    cmd = "?"
                hits.append(f"{entry.name} {part}: {cmd}")
    return hits


class SeriesWatcher:
    """Lists a destination folder as fast as it can, the way an impatient reader would.

    Every visible (not hidden) folder ``depth`` levels below ``folder`` is taken as a series
    under its final name; each look at one that holds fewer than ``expected`` visible files
    (counted recursively) or no ``marker`` is recorded in :attr:`incomplete`. A test of "a
    reader never sees half a series" runs a transfer meanwhile and asserts that
    :attr:`incomplete` stayed empty while :attr:`looks` grew.
    """

    def __init__(
        self, folder: Path, expected: int, *, marker: str = ".complete", depth: int = 1
    ) -> None:
        self.folder = folder
        self.expected = expected
        self.marker = marker
        self.depth = depth
        self.looks = 0
        self.incomplete: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="series-watcher", daemon=True)

    def start(self) -> SeriesWatcher:
        self._thread.start()
        return self

    def stop(self) -> SeriesWatcher:
        self._stop.set()
        self._thread.join(10)
        return self

    def _series(self) -> list[Path]:
        level = [self.folder]
        for _ in range(self.depth):
            nxt: list[Path] = []
            for parent in level:
                with contextlib.suppress(OSError):
                    nxt.extend(
                        Path(e.path)
                        for e in os.scandir(parent)
                        if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                    )
            level = nxt
        return level

    def _count(self, series: Path) -> tuple[int, bool]:
        files, marker = 0, False
        for root, dirs, names in os.walk(series):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += sum(1 for n in names if not n.startswith("."))
            if Path(root) == series and self.marker in names:
                marker = True
        return files, marker

    def _run(self) -> None:
        while not self._stop.is_set():
            for series in self._series():
                files, marker = self._count(series)
                self.looks += 1
                self.seen.add(series.name)
                if files < self.expected or not marker:
                    self.incomplete.append(f"{series}: {files} file(s), marker {marker}")
            time.sleep(0.002)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime_ns) of the visible files below ``folder``.

    A file whose inode and mtime did not change between two snapshots was not uploaded again
    (every upload this project's targets make writes a new file and renames it into place).
    """
    found: dict[str, tuple[int, int]] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            st = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (st.st_ino, st.st_mtime_ns)
    return found


SettingsFactory = Callable[..., dict[str, Any]]


def ssh_target_settings(
    target_type: str, server: OpenSSHServer, folder: Path, known_hosts: Path
) -> SettingsFactory:
    """``make(**overrides)``: the settings of an SSH target for ``server``'s account.

    Key login into ``folder``, the host key checked against ``known_hosts``. An override of
    ``None`` removes that setting (``key_file=None, password=...`` for a password login);
    ``server=`` gives the settings for another sshd of the same account. A plugin's
    ``conftest.py`` returns this from its ``settings`` fixture.
    """
    default = server

    def make(*, server: OpenSSHServer | None = None, **overrides: Any) -> dict[str, Any]:
        peer = server or default
        values: dict[str, Any] = {
            "target_type": target_type,
            "host": "127.0.0.1",
            "port": peer.port,
            "user": peer.account.user,
            "folder": str(folder),
            "key_file": str(peer.account.key),
            "known_hosts": str(known_hosts),
            **overrides,
        }
        return {k: v for k, v in values.items() if v is not None}

    return make


def check_delivered(remote: Path, task_id: str, files: list[Path], *, folder: str = "") -> Path:
    """Assert mercure's layout: ``remote/<task id>/`` holds exactly ``files`` (names and bytes)
    and a ``.complete`` marker naming the job, and no hidden staging folder is left beside it.
    Returns the series folder. ``folder`` overrides the series folder's relative path."""
    series = remote / (folder or task_id)
    assert series.is_dir(), f"{series} missing; {remote} has {sorted(os.listdir(remote))}"
    hidden = [n for n in os.listdir(series.parent) if n.startswith(".")]
    assert not hidden, f"left behind in {series.parent}: {hidden}"
    names = sorted(os.listdir(series))
    assert names == sorted([f.name for f in files] + [".complete"]), names
    for src in files:
        assert (series / src.name).read_bytes() == src.read_bytes(), f"{src.name} differs"
    assert task_id in (series / ".complete").read_text()
    return series


__all__ = [
    "SSHD",
    "OpenSSHServer",
    "SSHAccount",
    "SeriesWatcher",
    "SettingsFactory",
    "check_delivered",
    "create_ssh_account",
    "delete_ssh_account",
    "fingerprint_of",
    "make_keypair",
    "processes_containing",
    "remove_base_folder",
    "snapshot",
    "ssh_base_folder",
    "ssh_target_settings",
]
