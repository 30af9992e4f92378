"""Checking the server's host key: a known_hosts file, a pinned fingerprint, or first use.

An SFTP upload to a server that merely claims to be the configured host would hand patient
data to whoever answers, so the default refuses every server whose key is not already in a
known_hosts file; the error names the key's fingerprint so that an operator can check it with
the server's administrator and add it. A changed key is always refused.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import threading
from pathlib import Path

import paramiko
from mercure.targets import PermanentTargetError
from paramiko.hostkeys import HostKeyEntry

SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
_tofu_lock = threading.Lock()  # several dispatcher threads may pin the same host at once


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` of a public key, the way ``ssh`` and ``ssh-keygen -l`` print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_name(host: str, port: int) -> str:
    """The host's name in known_hosts: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def user_known_hosts(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else Path("~/.ssh/known_hosts").expanduser()


class UnknownHostKey(PermanentTargetError):
    """The server's key is in no known_hosts file and first use is not trusted."""


class ChangedHostKey(PermanentTargetError):
    """The server's key differs from the one on record: refused, whatever the settings."""


def changed_key_error(
    host: str, port: int, got: paramiko.PKey, expected: paramiko.PKey, where: str
) -> ChangedHostKey:
    name = known_name(host, port)
    return ChangedHostKey(
        f"host key of {name} has CHANGED: the server sent {got.get_name()} {fingerprint(got)}, "
        f"but {where} has {expected.get_name()} {fingerprint(expected)}. This is either a "
        "reinstalled server or someone intercepting the connection: check the new fingerprint "
        f"with the server's administrator before removing the old key "
        f"(ssh-keygen -f {where} -R '{name}')"
    )


class _Refuse(paramiko.MissingHostKeyPolicy):
    def __init__(self, port: int, known_hosts: Path) -> None:
        self.port = port
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        host = hostname.split("]")[0].lstrip("[")
        raise UnknownHostKey(
            f"host key of {hostname} is not known: the server sent {key.get_name()} "
            f"{fingerprint(key)}. Check that fingerprint with the server's administrator, then "
            f"add the key to {self.known_hosts} (ssh-keyscan -p {self.port} {host} >> "
            f"{self.known_hosts}), or pin it with host_key_fingerprint, or set "
            "trust_on_first_use to accept and pin the first key seen"
        )


class _Pinned(paramiko.MissingHostKeyPolicy):
    """Accept exactly the key with the configured fingerprint (no known_hosts is read)."""

    def __init__(self, pinned: str) -> None:
        self.pinned = pinned

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        got = fingerprint(key)
        if got != self.pinned:
            raise ChangedHostKey(
                f"host key of {hostname} does not match host_key_fingerprint: the server sent "
                f"{key.get_name()} {got}, the configuration pins {self.pinned}. Either the "
                "server was reinstalled or someone intercepts the connection: check with the "
                "server's administrator"
            )


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept an unknown server once and record its key, so that it is checked from then on."""

    def __init__(self, known_hosts: Path, log: object) -> None:
        self.known_hosts = known_hosts
        self.log = log

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        with _tofu_lock:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.known_hosts, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # other router processes may pin it too
                fh.seek(0)
                recorded = paramiko.HostKeys()
                for line in fh.read().splitlines():
                    entry = HostKeyEntry.from_line(line)
                    if entry is not None:
                        for name in entry.hostnames:
                            recorded.add(name, entry.key.get_name(), entry.key)
                known = recorded.lookup(hostname)
                if known is not None:  # pinned meanwhile by another thread or process
                    expected = known.get(key.get_name()) or next(iter(known.values()))
                    if expected != key:
                        host = hostname.split("]")[0].lstrip("[")
                        port = int(hostname.rsplit(":", 1)[1]) if hostname.startswith("[") else 22
                        raise changed_key_error(host, port, key, expected, str(self.known_hosts))
                    return
                line = HostKeyEntry([hostname], key).to_line()
                assert line is not None
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        info = getattr(self.log, "warning", None)
        if callable(info):
            info(
                "trusted an unknown host key on first use and pinned it",
                host=hostname,
                key=f"{key.get_name()} {fingerprint(key)}",
                known_hosts=str(self.known_hosts),
            )


def apply_policy(
    client: paramiko.SSHClient,
    *,
    port: int,
    known_hosts: str | None,
    pinned: str | None,
    trust_on_first_use: bool,
    log: object,
) -> str:
    """Load the keys to check against into ``client`` and set its policy; returns the source.

    The source (a file name or ``host_key_fingerprint``) is what error messages cite.
    """
    if pinned:
        client.set_missing_host_key_policy(_Pinned(pinned))
        return "host_key_fingerprint"
    user_file = user_known_hosts(known_hosts)
    try:
        if user_file.exists():
            client.load_host_keys(str(user_file))
        if not known_hosts and SYSTEM_KNOWN_HOSTS.exists():
            client.load_system_host_keys(str(SYSTEM_KNOWN_HOSTS))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise PermanentTargetError(f"cannot read known_hosts file {user_file}: {exc}") from exc
    if trust_on_first_use:
        client.set_missing_host_key_policy(_TrustOnFirstUse(user_file, log))
    else:
        client.set_missing_host_key_policy(_Refuse(port, user_file))
    return str(user_file)
