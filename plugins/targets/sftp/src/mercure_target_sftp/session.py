"""One SSH connection and its SFTP session, with errors turned into the target's errors.

A paramiko ``SSHClient`` / ``SFTPClient`` is not safe to share between threads, and
``Target.send`` runs in several dispatcher threads at once: each ``send`` opens a
:class:`Session` of its own, uses it for every file of its job, and closes it. Nothing of
paramiko's is shared between threads except the loaded private key, which is immutable.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from posixpath import dirname, join

import paramiko
from mercure.targets import PermanentTargetError, TargetError

from mercure_target_sftp.hostkeys import apply_policy, changed_key_error, fingerprint
from mercure_target_sftp.layout import part_name

READ_LIMIT = 64 * 1024  # the marker is a line of JSON


def load_private_key(
    *, key_file: str | None, private_key: str | None, passphrase: str | None
) -> paramiko.PKey | None:
    """The configured private key, or None; a key that cannot be used is a permanent error."""
    if not (key_file or private_key):
        return None
    what = f"key_file {key_file}" if key_file else "private_key"
    try:
        if key_file:
            secret = passphrase.encode() if passphrase else None  # cryptography wants bytes
            return paramiko.PKey.from_path(Path(key_file).expanduser(), secret)
        assert private_key is not None
        return _key_from_text(private_key, passphrase or None)
    except paramiko.PasswordRequiredException:
        raise PermanentTargetError(
            f"{what} is encrypted with a passphrase: set key_passphrase"
        ) from None
    except OSError as exc:
        raise PermanentTargetError(
            f"cannot read {what}: {exc.strerror or exc}; check the path and its permissions"
        ) from None
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        text = str(exc)
        if not passphrase and ("password" in text.lower() or "encrypted" in text.lower()):
            raise PermanentTargetError(
                f"{what} is encrypted with a passphrase: set key_passphrase"
            ) from None
        hint = "wrong key_passphrase?" if passphrase else "not a private key?"
        raise PermanentTargetError(
            f"cannot load {what}: {text} ({hint} OpenSSH and PEM formats are read)"
        ) from None


def _key_from_text(text: str, passphrase: str | None) -> paramiko.PKey:
    """A private key given as text (a secret reference), of the type its header says."""
    kinds: list[type[paramiko.PKey]]
    if "BEGIN RSA PRIVATE KEY" in text:
        kinds = [paramiko.RSAKey]
    elif "BEGIN EC PRIVATE KEY" in text:
        kinds = [paramiko.ECDSAKey]
    elif "BEGIN OPENSSH PRIVATE KEY" in text:
        kinds = [_openssh_key_class(text)]
    else:
        kinds = [paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey]
    error: Exception | None = None
    for kind in kinds:
        try:
            return kind.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException:
            raise
        except (paramiko.SSHException, ValueError) as exc:
            error = exc
    raise paramiko.SSHException(str(error) if error else "unknown private key format")


def _openssh_key_class(text: str) -> type[paramiko.PKey]:
    """The key type recorded in an ``openssh-key-v1`` blob (its public part is unencrypted)."""
    body = "".join(
        line.strip() for line in text.strip().splitlines() if line.strip() and "-----" not in line
    )
    try:
        blob = base64.b64decode(body)
        magic = b"openssh-key-v1\0"
        if not blob.startswith(magic):
            raise ValueError("not an openssh-key-v1 key")
        pos = len(magic)
        for _ in range(3):  # cipher name, kdf name, kdf options
            (length,) = struct.unpack(">I", blob[pos : pos + 4])
            pos += 4 + length
        pos += 4  # number of keys
        pos += 4  # length of the public key blob
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        key_type = blob[pos + 4 : pos + 4 + length].decode()
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise paramiko.SSHException(f"damaged OpenSSH private key: {exc}") from None
    if key_type == "ssh-ed25519":
        return paramiko.Ed25519Key
    if key_type.startswith("ecdsa-"):
        return paramiko.ECDSAKey
    if key_type == "ssh-rsa":
        return paramiko.RSAKey
    raise paramiko.SSHException(f"unsupported key type {key_type}")


@contextlib.contextmanager
def remote_errors(where: str, action: str) -> Iterator[None]:
    """Map what paramiko raises to :class:`TargetError` (retried) or the permanent kind."""
    try:
        yield
    except TargetError:
        raise
    except PermissionError as exc:
        raise PermanentTargetError(
            f"{action} on {where}: permission denied ({exc.strerror or exc}); give the account "
            "write access to the folder"
        ) from None
    except TimeoutError as exc:
        raise TargetError(f"{action} on {where}: no answer in time ({exc or 'timeout'})") from None
    except (EOFError, paramiko.SSHException, ConnectionError) as exc:
        raise TargetError(f"{action} on {where}: connection lost ({exc or 'EOF'})") from None
    except OSError as exc:
        text = exc.strerror or str(exc) or exc.__class__.__name__
        raise TargetError(f"{action} on {where}: {text}") from None


class Session:
    """An open SFTP session to the target's server; use from one thread only."""

    def __init__(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient, where: str):
        self.client = client
        self.sftp = sftp
        self.where = where
        self._posix_rename = True
        self._dirs: set[str] = set()
        self.host_key = ""

    @classmethod
    def open(
        cls,
        *,
        host: str,
        port: int,
        user: str,
        password: str | None,
        pkey: paramiko.PKey | None,
        known_hosts: str | None,
        pinned: str | None,
        trust_on_first_use: bool,
        timeout: float,
        log: object,
    ) -> Session:
        """Connect, check the host key, log in and start SFTP; errors say which step failed."""
        where = f"{user}@{host}:{port}"
        client = paramiko.SSHClient()
        try:
            source = apply_policy(
                client,
                port=port,
                known_hosts=known_hosts,
                pinned=pinned,
                trust_on_first_use=trust_on_first_use,
                log=log,
            )
            use_defaults = not (password or pkey)  # like ssh: the user's keys and agent
            try:
                client.connect(
                    hostname=host,
                    port=port,
                    username=user,
                    password=password or None,
                    pkey=pkey,
                    timeout=timeout,
                    banner_timeout=timeout,
                    auth_timeout=timeout,
                    channel_timeout=timeout,
                    allow_agent=use_defaults,
                    look_for_keys=use_defaults,
                )
            except paramiko.BadHostKeyException as exc:
                raise changed_key_error(host, port, exc.key, exc.expected_key, source) from None
            except paramiko.AuthenticationException as exc:
                method = "key" if pkey else "password" if password else "default keys or agent"
                raise PermanentTargetError(
                    f"login to {where} with {method} failed ({exc}); check user, password or "
                    "key (and that the key is in the account's authorized_keys)"
                ) from None
            except socket.gaierror as exc:
                raise TargetError(f"cannot resolve host {host}: {exc.strerror or exc}") from None
            except paramiko.ssh_exception.NoValidConnectionsError as exc:
                raise TargetError(f"cannot connect to {host}:{port}: {exc}") from None
            except paramiko.SSHException as exc:
                if "No authentication methods available" in str(exc):
                    raise PermanentTargetError(
                        f"login to {where}: no password, key_file or private_key is set and "
                        "the router's user has no SSH keys or agent"
                    ) from None
                raise TargetError(f"SSH connection to {host}:{port} failed: {exc}") from None
            with remote_errors(where, "starting SFTP"):
                sftp = client.open_sftp()
                channel = sftp.get_channel()
                if channel is not None:
                    channel.settimeout(timeout)
        except TargetError:
            client.close()
            raise
        except (OSError, EOFError) as exc:
            client.close()
            text = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            raise TargetError(f"cannot connect to {host}:{port}: {text}") from None
        session = cls(client, sftp, where)
        transport = client.get_transport()
        if transport is not None:
            key = transport.get_remote_server_key()
            session.host_key = f"{key.get_name()} {fingerprint(key)} ({source})"
        return session

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    def stat(self, path: str) -> paramiko.SFTPAttributes | None:
        """The path's attributes, or None if it does not exist."""
        with remote_errors(self.where, f"looking at {path}"):
            try:
                return self.sftp.stat(path)
            except FileNotFoundError:
                return None

    def is_dir(self, path: str) -> bool:
        attrs = self.stat(path)
        return attrs is not None and stat.S_ISDIR(attrs.st_mode or 0)

    def read_text(self, path: str) -> str | None:
        """A small file's text, or None if it does not exist."""
        with remote_errors(self.where, f"reading {path}"):
            try:
                with self.sftp.open(path, "rb") as fh:
                    return fh.read(READ_LIMIT).decode("utf-8", errors="replace")
            except FileNotFoundError:
                return None

    def mkdir(self, path: str) -> None:
        """Create ``path`` unless it is a folder already (another job may create it too)."""
        if path in self._dirs:
            return
        with remote_errors(self.where, f"creating folder {path}"):
            try:
                self.sftp.mkdir(path)
            except OSError:
                if not self.is_dir(path):
                    raise
        self._dirs.add(path)

    def makedirs(self, path: str, below: str) -> None:
        """Create ``path`` and its missing parents, which all lie below the folder ``below``."""
        missing: list[str] = []
        current = path
        while current not in ("", ".", "/", below) and not self.is_dir(current):
            missing.append(current)
            current = dirname(current)
        for folder in reversed(missing):
            self.mkdir(folder)

    def sizes(self, folder: str) -> dict[str, int]:
        """Relative path -> size of the files below ``folder`` (hidden names left out)."""
        found: dict[str, int] = {}
        todo = [""]
        with remote_errors(self.where, f"listing {folder}"):
            while todo:
                rel = todo.pop()
                for attrs in self.sftp.listdir_attr(join(folder, rel) if rel else folder):
                    name = attrs.filename
                    if name.startswith("."):
                        continue
                    child = join(rel, name) if rel else name
                    if stat.S_ISDIR(attrs.st_mode or 0):
                        self._dirs.add(join(folder, child))
                        todo.append(child)
                    else:
                        found[child] = int(attrs.st_size or 0)
        return found

    def put(self, local: Path, remote: str, size: int) -> None:
        """Upload under a hidden temporary name, check the size, then rename into place."""
        parent = dirname(remote)
        if parent not in self._dirs:
            self.mkdir(parent)
        tmp = part_name(remote)
        try:
            fh = open(local, "rb")  # noqa: SIM115 - closed below; a local error is not remote
        except OSError as exc:
            raise TargetError(f"cannot read {local}: {exc.strerror or exc}") from None
        with fh, remote_errors(self.where, f"uploading {local.name} to {remote}"):
            self.sftp.putfo(fh, tmp, file_size=size, confirm=True)
            self.replace(tmp, remote)

    def write_text(self, remote: str, text: str) -> None:
        tmp = part_name(remote)
        data = text.encode()
        with remote_errors(self.where, f"writing {remote}"):
            self.sftp.putfo(io.BytesIO(data), tmp, file_size=len(data), confirm=True)
            self.replace(tmp, remote)

    def replace(self, src: str, dst: str) -> None:
        """Rename a file over ``dst`` (OpenSSH's posix-rename; else remove, then rename)."""
        if self._posix_rename:
            try:
                self.sftp.posix_rename(src, dst)
                return
            except OSError as exc:
                if exc.errno is not None or "unsupported" not in str(exc).lower():
                    raise
                self._posix_rename = False
        with contextlib.suppress(FileNotFoundError):
            self.sftp.remove(dst)
        self.sftp.rename(src, dst)

    def rename_folder(self, src: str, dst: str) -> bool:
        """Rename a folder to a name that must not exist yet; False if ``dst`` exists."""
        with remote_errors(self.where, f"renaming {src} to {dst}"):
            try:
                self.sftp.rename(src, dst)
                return True
            except OSError as exc:
                if isinstance(exc, PermissionError) or self.stat(dst) is None:
                    raise
                return False

    def remove_tree(self, folder: str) -> None:
        """Remove a folder this target made (a probe, an abandoned staging folder)."""
        with remote_errors(self.where, f"removing {folder}"):
            for attrs in self.sftp.listdir_attr(folder):
                child = join(folder, attrs.filename)
                if stat.S_ISDIR(attrs.st_mode or 0):
                    self.remove_tree(child)
                else:
                    self.sftp.remove(child)
            self.sftp.rmdir(folder)


__all__ = ["Session", "load_private_key", "remote_errors"]
