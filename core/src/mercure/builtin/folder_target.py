"""The ``folder`` target: copies each job's instances into ``<folder>/<task id>/``.

Each file is copied under a temporary name, fsynced and renamed, so a reader of the target
folder never sees half a file, and a resend after a crash overwrites the same names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from mercure import hookimpl
from mercure.fsutil import TMP_PREFIX, fsync_dir, safe_component, tmp_name
from mercure.registry import RegisterFn
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig, TargetError


class FolderTargetConfig(TargetConfig):
    target_type: Literal["folder"] = "folder"
    folder: str


class FolderTarget(Target[FolderTargetConfig]):
    """Copies instances to a local or mounted folder."""

    def send(self, job: DeliveryJob) -> DeliveryResult:
        base = Path(self.config.folder)
        if not base.is_dir():
            raise TargetError(
                f"target folder {base} does not exist or is not a folder; create it or mount it"
            )
        dest = base / safe_component(job.task_id)
        try:
            dest.mkdir(exist_ok=True)
        except OSError as exc:
            raise TargetError(f"cannot create {dest}: {exc.strerror}") from exc
        # Partial copies of a sender that died; the job's claim means nobody else writes here.
        for stale in dest.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        result = DeliveryResult()
        for src in job.files:
            final = dest / src.name
            tmp = tmp_name(final)
            try:
                shutil.copyfile(src, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except OSError as exc:
                if tmp.exists():
                    tmp.unlink()
                result.failed[src.name] = f"copy to {final} failed: {exc.strerror or exc}"
                continue
            result.delivered.append(src.name)
        fsync_dir(dest)
        return result

    def test_connection(self) -> str:
        base = Path(self.config.folder)
        if not base.is_dir():
            raise TargetError(f"folder {base} does not exist")
        if not os.access(base, os.W_OK):
            raise TargetError(f"folder {base} is not writable by this user")
        return f"folder {base} exists and is writable"


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("folder", FolderTargetConfig, FolderTarget)
