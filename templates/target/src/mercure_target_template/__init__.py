"""The ``template`` target: a small but real target plugin to copy, rename and make your own.

It copies each instance of a job into ``folder`` under a path built from ``path_pattern`` (DICOM
tags of the series, the task id, the file name), and appends one JSON line per delivered
instance to ``manifest`` with its SHA-256 and, when ``signing_key`` is set, an HMAC-SHA256 that
lets the receiving side check the file came from this router.

What it shows a plugin author:

* a configuration model: a :class:`~mercure.targets.TargetConfig` subclass with a
  ``target_type`` literal, fields with defaults, a validator that rejects a bad value when the
  configuration loads, and a :data:`~mercure.secrets.OptionalSecret` field (plaintext,
  ``${env:NAME}`` or ``${file:/path}``);
* :meth:`send` reporting per-file results, so that a retry sends only what failed, and raising
  :class:`~mercure.targets.TargetError` when nothing can be sent;
* :meth:`test_connection` for ``mercure targets test``;
* registration through the ``register_targets`` hook.

Durability: each file is written under a temporary name, fsynced and renamed; the manifest lines
of a call are appended in one write and fsynced before the files are reported delivered. After
a crash between the two, a retry copies the same files again and the manifest may hold a line
twice: readers should key on ``sop_instance_uid``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from mercure import hookimpl
from mercure.fsutil import fsync_dir, tmp_name
from mercure.lifecycle import PluginContext
from mercure.patterns import TagPattern, TagPatternField
from mercure.registry import RegisterFn
from mercure.secrets import OptionalSecret
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig, TargetError
from pydantic import field_validator

_CHUNK = 1 << 20


class TemplateTargetConfig(TargetConfig):
    """``{"target_type": "template", "folder": "/data/out", ...}`` in ``mercure.json``."""

    target_type: Literal["template"] = "template"
    folder: str
    #: Path of each instance below ``folder``: ``{Keyword}`` is a series tag (``UNKNOWN`` if
    #: absent), plus ``{task_id}``, ``{filename}`` and ``{target}``; checked when the
    #: configuration loads (mercure.patterns).
    path_pattern: TagPatternField = TagPattern.parse("{PatientID}/{SeriesInstanceUID}/{filename}")
    #: JSON-lines file, relative to ``folder`` (or absolute), one line per delivered instance.
    manifest: str = "manifest.jsonl"
    #: Key for an HMAC-SHA256 of each file in the manifest; empty or null: no HMAC.
    signing_key: OptionalSecret = None

    @field_validator("path_pattern")
    @classmethod
    def _needs_filename(cls, pattern: TagPattern) -> TagPattern:
        if "filename" not in pattern.fields:
            raise ValueError("path_pattern must contain {filename}, or instances would collide")
        return pattern


class TemplateTarget(Target[TemplateTargetConfig]):
    """Copies instances by a name pattern and records each one in a manifest."""

    def __init__(
        self, name: str, config: TemplateTargetConfig, context: PluginContext | None = None
    ) -> None:
        super().__init__(name, config, context)
        self._manifest_lock = threading.Lock()  # send() may run in several threads at once
        key = config.signing_key or ""
        self._key = key.encode("utf-8") if key else None

    def relative_path(self, job: DeliveryJob, src: Path) -> Path:
        """Where ``src`` goes below ``folder``; every value becomes one safe path component."""
        values = {**job.tags, "task_id": job.task_id, "filename": src.name, "target": self.name}
        return Path(self.config.path_pattern.render(values))

    def send(self, job: DeliveryJob) -> DeliveryResult:
        base = Path(self.config.folder)
        if not base.is_dir():
            raise TargetError(f"folder {base} does not exist; create it or mount it")
        result = DeliveryResult()
        lines: dict[str, bytes] = {}
        parents: set[Path] = set()
        for src in job.files:
            dest = base / self.relative_path(job, src)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                sha256, signature = self._copy(src, dest)
            except OSError as exc:
                result.failed[src.name] = f"copy to {dest} failed: {exc.strerror or exc}"
                continue
            parents.add(dest.parent)
            lines[src.name] = self._manifest_line(job, src, dest, sha256, signature)
        for parent in parents:
            fsync_dir(parent)
        if lines:
            try:
                self._append_manifest(b"".join(lines.values()))
            except OSError as exc:
                reason = f"manifest {self.manifest_path} not written: {exc.strerror or exc}"
                result.failed.update(dict.fromkeys(lines, reason))
                return result
            result.delivered.extend(lines)
        return result

    @property
    def manifest_path(self) -> Path:
        return Path(self.config.folder) / self.config.manifest

    def _copy(self, src: Path, dest: Path) -> tuple[str, str | None]:
        """Copy durably under a temporary name; return the SHA-256 and the HMAC (or None)."""
        sha = hashlib.sha256()
        mac = hmac.new(self._key, digestmod="sha256") if self._key else None
        tmp = tmp_name(dest)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    sha.update(chunk)
                    if mac is not None:
                        mac.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return sha.hexdigest(), mac.hexdigest() if mac is not None else None

    def _manifest_line(
        self, job: DeliveryJob, src: Path, dest: Path, sha256: str, signature: str | None
    ) -> bytes:
        entry: dict[str, Any] = {
            "time": time.time(),
            "target": self.name,
            "task_id": job.task_id,
            "series_uid": job.tags.get("SeriesInstanceUID", ""),
            "sop_instance_uid": src.stem,
            "path": str(dest.relative_to(self.config.folder)),
            "size": dest.stat().st_size,
            "sha256": sha256,
        }
        if signature is not None:
            entry["hmac_sha256"] = signature
        return (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")

    def _append_manifest(self, data: bytes) -> None:
        """Append in one write with O_APPEND, then fsync: lines are never interleaved or torn."""
        with self._manifest_lock:
            fd = os.open(self.manifest_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    def test_connection(self) -> str:
        base = Path(self.config.folder)
        if not base.is_dir():
            raise TargetError(f"folder {base} does not exist; create it or mount it")
        if not os.access(base, os.W_OK):
            raise TargetError(f"folder {base} is not writable by this user")
        signed = "HMAC-signed" if self._key else "unsigned"
        return f"folder {base} is writable; {signed} manifest {self.manifest_path}"


@hookimpl
def register_targets(register: RegisterFn) -> None:
    """Add the ``template`` target type (called once when the plugin manager is built)."""
    register("template", TemplateTargetConfig, TemplateTarget)
