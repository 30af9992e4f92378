"""The users file: who may log in, with which role, by argon2 password hash.

The file is mercure's ``users.json`` form, so an existing one keeps its users::

    {"alice": {"password": "$argon2id$v=19$m=65536,t=3,p=4$...", "role": "operator"},
     "bob":   {"password": "$argon2id$...", "is_admin": "False"}}

``role`` is ``viewer`` or ``operator``; without it mercure's ``is_admin`` decides ("True":
operator). A password hash that is not argon2 (older mercure files used other schemes) cannot
log in: set a new password with ``mercure web user passwd NAME``. The file is re-read when it
changes and written atomically, readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from mercure.fsutil import fsync_dir, tmp_name

from mercure_web_dashboard.settings import ROLES, Role

HASHER = PasswordHasher()
MIN_PASSWORD = 10
# Verifying against this keeps a login for an unknown user as slow as one for a known user.
_DUMMY_HASH = HASHER.hash("not a password of anyone")


class UsersFileError(ValueError):
    """The users file cannot be read or is not in the expected form."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str = ""


def _role_of(name: str, entry: dict[str, Any], path: Path) -> Role:
    role = entry.get("role")
    if role is None:
        return "operator" if str(entry.get("is_admin", "False")).lower() == "true" else "viewer"
    if role not in ROLES:
        raise UsersFileError(f"{path}: user '{name}' has role {role!r}; use viewer or operator")
    return role


class UsersFile:
    """The users of one file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._raw: dict[str, dict[str, Any]] = {}
        self._users: dict[str, User] = {}

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._raw, self._users = None, {}, {}
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError) as exc:
            raise UsersFileError(f"cannot read the users file {self.path}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise UsersFileError(f"{self.path} must hold an object of user name -> settings")
        users = {
            str(name): User(
                str(name), _role_of(str(name), e, self.path), str(e.get("password", ""))
            )
            for name, e in data.items()
        }
        self._stamp, self._raw, self._users = stamp, data, users

    def users(self) -> dict[str, User]:
        with self._lock:
            self._load()
            return dict(self._users)

    def get(self, name: str) -> User | None:
        return self.users().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs; None otherwise (same work either way)."""
        user = self.get(name)
        stored = user.password_hash if user and user.password_hash.startswith("$argon2") else None
        try:
            HASHER.verify(stored or _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if stored is None or user is None:
            return None
        if HASHER.check_needs_rehash(stored):
            self.set_password(user.name, password, user.role)
        return user

    # -- changes (from ``mercure web user ...``) -----------------------------------------------

    def set_password(self, name: str, password: str, role: Role | None = None) -> User:
        if len(password) < MIN_PASSWORD:
            raise UsersFileError(f"the password must have at least {MIN_PASSWORD} characters")
        if not name or any(c in name for c in "\r\n\t ") or len(name) > 64:
            raise UsersFileError(f"user name {name!r} must be 1-64 characters without spaces")
        with self._lock:
            self._load()
            raw = {k: dict(v) for k, v in self._raw.items()}
            entry = raw.setdefault(name, {})
            entry["password"] = HASHER.hash(password)
            if role is not None:
                entry["role"] = role
            entry.setdefault("role", _role_of(name, entry, self.path))
            entry.pop("change_password", None)
            self._write(raw)
            return User(name, entry["role"], entry["password"])

    def remove(self, name: str) -> bool:
        with self._lock:
            self._load()
            if name not in self._raw:
                return False
            raw = {k: v for k, v in self._raw.items() if k != name}
            self._write(raw)
            return True

    def _write(self, raw: dict[str, dict[str, Any]]) -> None:
        """Atomically, created readable by its owner only (the hashes are not for others)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(self.path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write((json.dumps(raw, indent=2) + "\n").encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)
        self._stamp = None


__all__ = ["MIN_PASSWORD", "User", "UsersFile", "UsersFileError"]
