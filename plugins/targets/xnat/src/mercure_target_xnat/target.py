"""The ``xnat`` target: a job's instances as one zip to XNAT's image session import service.

* The zip is written to a temporary file (``spool_folder``) from the instance files, member
  by member, never built in memory, and streamed from there in the request body
  (``POST /data/services/import?inbody=true`` with ``Content-Type: application/zip``).
* ``PROJECT_ID`` is the target's project; ``SUBJECT_ID`` and ``EXPT_LABEL`` come from the
  first instance's tags through ``subject_label`` and ``session_label`` (mercure's way by
  default: PatientID, and PatientID_YYYY-MM-DD of the study date).
* XNAT's answer decides, for the whole job: 200 naming the session is delivered. Anything
  else is not, even when XNAT kept part of the upload (its DICOM-zip importer answers 400 but
  keeps the files before the one it could not read): 401/403/404/400/409 cannot succeed as
  configured, so the job goes to ``error/`` at once with XNAT's message; 5xx, timeouts and
  network failures are retried. A re-upload is harmless with ``overwrite`` ``append`` (the
  default): XNAT merges what it already holds.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

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

from mercure_target_xnat.config import XnatTargetConfig, xnat_label
from mercure_target_xnat.session import Answer, XnatSession

log = get_logger("mercure.target.xnat")
CHUNK = 256 * 1024

PERMANENT = {
    400: "XNAT refused the upload",
    403: "the user may not import into this project",
    404: "XNAT has no such project or import service",
    409: "the session exists and overwrite is 'none'",
    413: "the upload is larger than XNAT (or a proxy in front of it) accepts",
    415: "XNAT does not accept the zip",
}


def study_date_iso(value: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; other text unchanged."""
    try:
        return datetime.datetime.strptime(value.strip(), "%Y%m%d").strftime("%Y-%m-%d")
    except ValueError:
        return value


class XnatTarget(Target[XnatTargetConfig]):
    """Uploads each job as one zip; the JSESSION is kept across jobs and ended at shutdown."""

    streaming = False

    def __init__(
        self, name: str, config: XnatTargetConfig, context: PluginContext | None = None
    ) -> None:
        super().__init__(name, config, context)
        self.session = XnatSession(name, config)

    def labels(self, job: DeliveryJob, index: InstanceIndex, name: str) -> tuple[str, str]:
        """Subject and session label for the job, from the header of file ``name``."""
        fields = {*self.config.subject_label.fields, *self.config.session_label.fields}
        fields.discard("StudyDateISO")
        values: dict[str, str] = {**job.tags}
        values.update(index.tags(name, [*fields, "StudyDate"]))
        values["StudyDateISO"] = study_date_iso(values.get("StudyDate", ""))
        subject = xnat_label(self.config.subject_label.render(values))
        session = xnat_label(self.config.session_label.render(values))
        return subject, session

    def send(self, job: DeliveryJob) -> DeliveryResult:
        index = job.index()
        failed = {name: f"not sent: {why}" for name, why in index.unreadable.items()}
        readable = [f for f in job.files if index.by_name(f.name) is not None]
        if not readable:
            return DeliveryResult(failed=failed, error="no readable DICOM instance to upload")
        subject, session = self.labels(job, index, readable[0].name)
        params = {
            "inbody": "true",
            "import-handler": self.config.import_handler,
            "PROJECT_ID": self.config.project_id,
            "SUBJECT_ID": subject,
            "EXPT_LABEL": session,
            "overwrite": self.config.overwrite,
            "rename": "true",
        }
        where = f"project {self.config.project_id}, subject {subject}, session {session}"
        with tempfile.TemporaryFile(
            prefix="mercure-xnat-", suffix=".zip", dir=self.config.spool_folder
        ) as spool:
            size = self._zip(readable, spool)
            answer = self.session.request(
                "POST",
                "/data/services/import",
                params=params,
                headers={"Content-Type": "application/zip", "Content-Length": str(size)},
                body=lambda: _chunks(spool),
            )
        uris = [line.strip() for line in answer.text.splitlines() if "/data/" in line]
        if answer.status == 200 and uris:
            log.info(
                "XNAT import finished",
                target=self.name,
                task_id=job.task_id,
                instances=len(readable),
                session=uris[0],
                where=where,
            )
            if all("/prearchive/" in uri for uri in uris):
                log.warning(
                    "XNAT kept the upload in its prearchive: archive it there (the project "
                    "does not archive automatically, or the session conflicts)",
                    target=self.name,
                    task_id=job.task_id,
                    session=uris[0],
                )
            return DeliveryResult(delivered=[f.name for f in readable], failed=failed)
        raise self._failure(answer, where, len(readable))

    def _zip(self, files: list[Any], spool: IO[bytes]) -> int:
        method = zipfile.ZIP_DEFLATED if self.config.compress_zip else zipfile.ZIP_STORED
        try:
            with zipfile.ZipFile(spool, "w", compression=method, allowZip64=True) as archive:
                for path in files:
                    archive.write(path, arcname=path.name)  # copied in chunks, not read whole
        except OSError as exc:
            where = self.config.spool_folder or tempfile.gettempdir()
            raise TargetError(
                f"cannot write the upload zip in {where}: {exc.strerror or exc}; it needs room "
                "for the job's instances once more (spool_folder)"
            ) from exc
        spool.flush()
        return spool.tell()

    def _failure(self, answer: Answer, where: str, count: int) -> TargetError:
        said = answer.said() or "no details"
        what = f"XNAT import of {count} instance(s) into {where}: {answer.label}"
        if answer.status == 200:
            return TargetError(
                f"{what} but the answer names no session ({said!r}); the job is not counted "
                "as delivered and is retried"
            )
        if answer.status in PERMANENT:
            partial = (
                "; XNAT may keep the part of the upload it read in its prearchive, a retry "
                "uploads the whole job again"
                if answer.status == 400
                else ""
            )
            return PermanentTargetError(f"{what}: {PERMANENT[answer.status]} ({said}){partial}")
        if answer.status >= 500 or answer.status in (408, 429):
            return TargetError(f"{what} ({said}); retried")
        return PermanentTargetError(f"{what} ({said})")

    def test_connection(self) -> str:
        answer = self.session.check_credentials()
        if answer.status == 200:
            return f"XNAT at {self.config.host} accepted user '{self.config.user}' (GET /data/auth)"
        raise TargetError(
            f"XNAT at {self.config.host} answered GET /data/auth for user "
            f"'{self.config.user}' with {answer.label}: {answer.said() or 'no details'}"
            + ("; check user and password" if answer.status in (401, 403) else "")
        )

    def close(self) -> None:
        self.session.close()


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    """The spooled zip from its start, in chunks (a fresh stream for every try)."""
    spool.seek(0, os.SEEK_SET)
    while chunk := spool.read(CHUNK):
        yield chunk
