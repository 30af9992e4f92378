"""The ``sftp`` target: each job's instances into one folder on an SFTP server, all at once.

See :mod:`mercure_target_sftp.layout` for the layout and why a reader never sees half a
series, and :mod:`mercure_target_sftp.session` for why every ``send`` has its own connection.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from posixpath import join

import paramiko
from mercure.instances import InstanceIndex
from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.targets import (
    DeliveryJob,
    DeliveryResult,
    PermanentTargetError,
    Target,
    TargetError,
)

from mercure_target_sftp.config import SftpTargetConfig
from mercure_target_sftp.layout import MARKER, SeriesPaths, marker_names, marker_text, series_paths
from mercure_target_sftp.session import Session, load_private_key

log = get_logger("mercure.target.sftp")
#: Pattern fields known without reading an instance's header.
JOB_FIELDS = frozenset({"filename", "task_id", "target"})


class SftpTarget(Target[SftpTargetConfig]):
    """Uploads a job into a hidden staging folder on the server and renames it when complete.

    ``send`` may run in several threads at once: each call opens its own SSH connection and
    SFTP session (one per job, reused for all its files) and closes it before returning.
    """

    def __init__(
        self, name: str, config: SftpTargetConfig, context: PluginContext | None = None
    ) -> None:
        super().__init__(name, config, context)
        self._key_lock = threading.Lock()
        self._key: paramiko.PKey | None = None
        self._key_loaded = False

    # -- connection --------------------------------------------------------------------------

    def _private_key(self) -> paramiko.PKey | None:
        with self._key_lock:  # loaded once; a PKey is immutable and safe to share
            if not self._key_loaded:
                self._key = load_private_key(
                    key_file=self.config.key_file,
                    private_key=self.config.private_key,
                    passphrase=self.config.key_passphrase,
                )
                self._key_loaded = True
            return self._key

    def connect(self) -> Session:
        """A new session for the calling thread (close it, or use it in ``with``)."""
        cfg = self.config
        return Session.open(
            host=cfg.host,
            port=cfg.port,
            user=cfg.user,
            password=cfg.password,
            pkey=self._private_key(),
            known_hosts=cfg.known_hosts,
            pinned=cfg.host_key_fingerprint,
            trust_on_first_use=cfg.trust_on_first_use,
            timeout=cfg.timeout,
            log=log.bind(target=self.name),
        )

    # -- layout -------------------------------------------------------------------------------

    def paths(self, job: DeliveryJob) -> SeriesPaths:
        """The job's remote folders, from the series' tags (the same on every retry)."""
        values = {**job.tags, "task_id": job.task_id, "target": self.name}
        relative = self.config.folder_pattern.render(values)
        return series_paths(self.config.folder, relative, job.task_id)

    def plan(self, job: DeliveryJob) -> tuple[dict[str, Path], dict[str, str]]:
        """Relative path in the job's folder -> local file; and files that cannot be sent."""
        pattern = self.config.file_pattern
        index: InstanceIndex | None = None
        if not set(pattern.fields) <= JOB_FIELDS:
            index = job.index()
        planned: dict[str, Path] = {}
        failed: dict[str, str] = {}
        for path in job.files:
            if index is not None:
                if path.name in index.unreadable:
                    failed[path.name] = index.unreadable[path.name]
                    continue
                rel = job.render(pattern, index, path.name, target=self.name)
            else:
                values = {"filename": path.name, "task_id": job.task_id, "target": self.name}
                rel = pattern.render(values)
            if rel in planned:
                failed[path.name] = (
                    f"file_pattern gives {rel!r} for both {planned[rel].name} and {path.name}; "
                    "include {SOPInstanceUID} or {filename}"
                )
                continue
            if not path.is_file():
                failed[path.name] = f"{path} is missing from the job folder"
                continue
            planned[rel] = path
        return planned, failed

    # -- delivery -----------------------------------------------------------------------------

    def send(self, job: DeliveryJob) -> DeliveryResult:
        paths = self.paths(job)
        planned, failed = self.plan(job)
        if failed:
            # A series without these instances must not appear as complete: send nothing.
            return DeliveryResult(
                failed=failed,
                error=f"not sent: the series would be incomplete without {len(failed)} "
                "instance(s) that cannot be sent",
                permanent=True,
            )
        with self.connect() as session:
            if not session.is_dir(paths.base):
                raise PermanentTargetError(
                    f"folder {paths.base} does not exist on {session.where}; create it (the "
                    "target creates only the folders below it)"
                )
            done = self._own_complete(session, paths, job.task_id)
            dest = done or paths.staging
            if done is None:
                session.makedirs(paths.parent, below=paths.base)
                session.mkdir(paths.staging)
            present = session.sizes(dest)
            sent = 0
            for rel, local in sorted(planned.items()):
                try:
                    size = local.stat().st_size
                except OSError as exc:
                    raise TargetError(f"cannot read {local}: {exc.strerror or exc}") from None
                if present.get(rel) == size:
                    continue  # complete on the server from an earlier try
                session.put(local, join(dest, rel), size)
                sent += 1
            final = done or self._publish(session, paths, job.task_id)
        log.info(
            "series delivered" if done is None else "series was complete already",
            target=self.name,
            task_id=job.task_id,
            folder=final,
            uploaded=sent,
            already_there=len(planned) - sent,
        )
        return DeliveryResult(delivered=[p.name for p in planned.values()])

    def _own_complete(self, session: Session, paths: SeriesPaths, task_id: str) -> str | None:
        """The final folder of this job if an earlier try published it (crash before record)."""
        for candidate in (paths.final, paths.alternate):
            text = session.read_text(join(candidate, MARKER))
            if text is not None and marker_names(text, task_id):
                return candidate
        return None

    def _publish(self, session: Session, paths: SeriesPaths, task_id: str) -> str:
        """Write the marker into the staging folder, then rename it to its final name."""
        session.write_text(join(paths.staging, MARKER), marker_text(task_id, self.name))
        if session.rename_folder(paths.staging, paths.final):
            return paths.final
        log.warning(
            "the series folder exists already (another job's series); using a name of its own",
            target=self.name,
            task_id=task_id,
            taken=paths.final,
            folder=paths.alternate,
        )
        if session.rename_folder(paths.staging, paths.alternate):
            return paths.alternate
        raise PermanentTargetError(
            f"cannot publish {paths.staging}: both {paths.final} and {paths.alternate} exist on "
            f"{session.where}; move one of them away"
        )

    def test_connection(self) -> str:
        cfg = self.config
        with self.connect() as session:
            base = series_paths(cfg.folder, "x", "x").base
            if not session.is_dir(base):
                raise PermanentTargetError(f"folder {base} does not exist on {session.where}")
            probe = join(base, f".mercure-probe-{uuid.uuid4().hex}")
            session.mkdir(probe)
            session.remove_tree(probe)
            return (
                f"logged in to {session.where}, host key {session.host_key}; folder {base} "
                "exists and is writable"
            )
