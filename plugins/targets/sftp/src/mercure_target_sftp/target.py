"""The ``sftp`` target: each job's instances into one folder on an SFTP server, all at once.

See :mod:`mercure.remote_layout` for the layout and why a reader never sees half a series,
and :mod:`mercure_target_sftp.session` for why every ``send`` has its own connection.
"""

from __future__ import annotations

import threading
import uuid
from posixpath import join

import paramiko
from mercure.lifecycle import PluginContext
from mercure.logs import get_logger
from mercure.remote_layout import (
    MARKER,
    RemoteLayout,
    SeriesPaths,
    base_folder,
    marker_names,
    marker_text,
)
from mercure.targets import (
    DeliveryJob,
    DeliveryResult,
    PermanentTargetError,
    Target,
    TargetError,
)

from mercure_target_sftp.config import SftpTargetConfig
from mercure_target_sftp.session import Session, load_private_key

log = get_logger("mercure.target.sftp")


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

    # -- delivery -----------------------------------------------------------------------------

    def send(self, job: DeliveryJob) -> DeliveryResult:
        plan = RemoteLayout.of(self.config, self.name).plan(job)
        if plan.failed:
            return plan.incomplete()
        paths, planned = plan.paths, plan.files
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
        return plan.delivered(log, final, sent, already_complete=done is not None)

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
            base = base_folder(cfg.folder)
            if not session.is_dir(base):
                raise PermanentTargetError(f"folder {base} does not exist on {session.where}")
            probe = join(base, f".mercure-probe-{uuid.uuid4().hex}")
            session.mkdir(probe)
            session.remove_tree(probe)
            return (
                f"logged in to {session.where}, host key {session.host_key}; folder {base} "
                "exists and is writable"
            )
