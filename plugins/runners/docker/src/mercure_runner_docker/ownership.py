"""Who a container runs as, and giving its output back to the router's user afterwards.

A module runs as the router's own uid and gid, so what it writes is the router's already.
When it runs as someone else (the router is root, so the module runs as nobody; a root
module; an operator's ``user``), the runner opens the folders to that user before the run
and, once the container ended, makes every file in the output folder the router's again:
directly when the router is root, else through a short helper container that runs ``chown``
as root (mercure does the same with busybox).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mercure_runner_docker.settings import DockerRunnerSettings

NOBODY = (65534, 65534)


@dataclass(frozen=True)
class Identity:
    """The user a container runs as; ``None`` uid: the image's own user (a root module)."""

    uid: int | None
    gid: int | None

    @property
    def docker_user(self) -> str | None:
        if self.uid is None:
            return None
        return f"{self.uid}:{self.gid}" if self.gid is not None else str(self.uid)


def router_identity() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def container_identity(settings: DockerRunnerSettings, as_root: bool) -> Identity:
    """Whom the container runs as (see :attr:`DockerRunnerSettings.user`)."""
    if as_root:
        return Identity(None, None)
    if settings.user:
        uid, _, gid = settings.user.partition(":")
        return Identity(int(uid), int(gid) if gid else int(uid))
    uid, gid = router_identity()
    if uid == 0:
        return Identity(*NOBODY)
    return Identity(uid, gid)


def open_folders(identity: Identity, input_folder: Path, output_folder: Path) -> None:
    """Let ``identity`` read the input and write the output (no-op for the router's own)."""
    me, _ = router_identity()
    if identity.uid == me:
        return
    for root, _dirs, files in os.walk(input_folder):
        _add_mode(Path(root), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            _add_mode(Path(root) / name, stat.S_IROTH)
    if identity.uid is None:
        return  # root reads and writes anyway
    if me == 0:
        os.chown(output_folder, identity.uid, identity.gid if identity.gid is not None else -1)
    else:
        output_folder.chmod(0o777)


def _add_mode(path: Path, bits: int) -> None:
    with contextlib.suppress(OSError):
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & bits != bits:
            path.chmod(stat.S_IMODE(mode) | bits)


def foreign_paths(folder: Path) -> list[Path]:
    """Entries of ``folder`` (itself included) not owned by the router's user."""
    me, _ = router_identity()
    found = []
    for root, dirs, files in os.walk(folder):
        for name in [".", *dirs, *files]:
            path = Path(root) / name if name != "." else Path(root)
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_uid != me:
                    found.append(path)
    return found


def take_back(folder: Path) -> None:
    """As root: make everything in ``folder`` the router's and the folder itself 0755."""
    uid, gid = router_identity()
    for path in foreign_paths(folder):
        os.lchown(path, uid, gid)
    with contextlib.suppress(OSError):
        folder.chmod(0o755)


__all__ = [
    "NOBODY",
    "Identity",
    "container_identity",
    "foreign_paths",
    "open_folders",
    "router_identity",
    "take_back",
]
