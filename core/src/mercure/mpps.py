"""Modality Performed Procedure Step (MPPS): completion without waiting, where the modality says.

DICOM has no "end of series" in C-STORE, so a router waits for quiet periods
(``series_complete_trigger``, ``study_complete_trigger``). A modality that also reports MPPS
tells when it is done: its N-SET with ``PerformedProcedureStepStatus`` COMPLETED lists the
series it performed and the instances of each (``PerformedSeriesSequence`` ->
``ReferencedImageSequence`` / ``ReferencedNonImageCompositeSOPInstanceSequence``). The
receiver answers N-CREATE and N-SET as an MPPS SCP and keeps each procedure step as a JSON
record in ``incoming/.mpps/`` (written atomically and fsynced before it answers Success).
The router reads them (:class:`MppsIndex`):

* a series listed by a COMPLETED step with its instances is complete as soon as every listed
  instance is in, without waiting for ``series_complete_trigger``;
* a study whose procedure steps are all COMPLETED is complete for a study rule as soon as
  every series they list was added to it, without waiting for ``study_complete_trigger``.

The quiet timers stay the default and the fallback: a step IN PROGRESS or DISCONTINUED, a
series listed without instances, or listed instances that never come change nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from mercure.fsutil import atomic_write_bytes, is_valid_uid, safe_component
from mercure.logs import get_logger

log = get_logger("mercure.mpps")

MPPS_FOLDER = ".mpps"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
COMPLETED = "COMPLETED"
STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE = 0x0111
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_INVALID_ATTRIBUTE = 0x0106
STATUS_NOT_UPDATABLE = 0xA710  # MPPS: the step is no longer IN PROGRESS
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NOT_AUTHORIZED = 0x0124
KEEP_SECONDS = 7 * 86400.0
"""Procedure step records older than this (since their last change) are removed."""


# -- records -----------------------------------------------------------------------------------


def _uids(items: Any, keyword: str) -> list[str]:
    found = []
    for item in items or []:
        value = str(getattr(item, keyword, "") or "")
        if value:
            found.append(value)
    return found


def summary(ds: Dataset) -> dict[str, Any]:
    """What the router needs from a procedure step: its status, studies, series, instances."""
    series: dict[str, list[str]] = {}
    for item in getattr(ds, "PerformedSeriesSequence", None) or []:
        uid = str(getattr(item, "SeriesInstanceUID", "") or "")
        if not uid:
            continue
        instances = _uids(
            getattr(item, "ReferencedImageSequence", None), "ReferencedSOPInstanceUID"
        )
        instances += _uids(
            getattr(item, "ReferencedNonImageCompositeSOPInstanceSequence", None),
            "ReferencedSOPInstanceUID",
        )
        series.setdefault(uid, []).extend(instances)
    studies = _uids(getattr(ds, "ScheduledStepAttributesSequence", None), "StudyInstanceUID")
    return {
        "status": str(getattr(ds, "PerformedProcedureStepStatus", "") or "").strip().upper(),
        "studies": list(dict.fromkeys(studies)),
        "series": series,
    }


class MppsStore:
    """The procedure step records in ``incoming/.mpps/``: created, updated, read."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        self.folder = folder
        self.fsync = fsync  # the folder is made by the first N-CREATE

    def path(self, uid: str) -> Path:
        return self.folder / f"{safe_component(uid)}.json"

    @contextlib.contextmanager
    def _locked(self, uid: str) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f".{safe_component(uid)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, uid: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(uid).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self, uid: str, ds: Dataset, record: dict[str, Any] | None, sender: str) -> None:
        now = time.time()
        data = {
            "sop_instance_uid": uid,
            "sender": sender,
            "created_at": (record or {}).get("created_at", now),
            "updated_at": now,
            **summary(ds),
            "dataset": ds.to_json_dict(),
        }
        atomic_write_bytes(self.path(uid), json.dumps(data).encode("utf-8"), fsync=self.fsync)

    def create(self, uid: str, attributes: Dataset, sender: str) -> int:
        """N-CREATE: a new procedure step (IN PROGRESS, as the standard has it)."""
        with self._locked(uid):
            if self.path(uid).exists():
                return STATUS_DUPLICATE
            self._write(uid, attributes, None, sender)
        return STATUS_SUCCESS

    def update(self, uid: str, modifications: Dataset, sender: str) -> int:
        """N-SET: change a step that is still IN PROGRESS (to COMPLETED or DISCONTINUED)."""
        with self._locked(uid):
            record = self.read(uid)
            if record is None:
                return STATUS_NO_SUCH_INSTANCE
            if record.get("status") in (COMPLETED, "DISCONTINUED"):
                return STATUS_NOT_UPDATABLE
            ds = Dataset.from_json(record.get("dataset") or {})
            for element in modifications:
                ds[element.tag] = element
            self._write(uid, ds, record, sender)
        return STATUS_SUCCESS

    def records(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        if not self.folder.is_dir():
            return
        with os.scandir(self.folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".json") and e.name[0] != "."]
        for name in names:
            path = self.folder / name
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                yield path, data


# -- the receiver's side ----------------------------------------------------------------------


def add_context(ae: Any, transfer_syntaxes: list[str]) -> None:
    """Accept MPPS associations (the receiver's AE)."""
    ae.add_supported_context(MPPS_SOP_CLASS, transfer_syntaxes)


def handlers(spool_folder: Path, allowed: Callable[[Any], bool], *, fsync: bool = True) -> list:
    """The pynetdicom N-CREATE / N-SET handlers, storing into ``spool_folder/.mpps``."""
    from pynetdicom import evt

    store = MppsStore(spool_folder / MPPS_FOLDER, fsync=fsync)

    def sender(event: Any) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title}@{requestor.address}"

    def on_create(event: Any) -> tuple[int, Dataset | None]:
        if not allowed(event):
            return STATUS_NOT_AUTHORIZED, None
        if event.request.AffectedSOPClassUID != MPPS_SOP_CLASS:
            return STATUS_PROCESSING_FAILURE, None
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not is_valid_uid(uid):
            return STATUS_INVALID_ATTRIBUTE, None  # the SCP assigning UIDs is not supported
        try:
            attributes = event.attribute_list
            status = store.create(uid, attributes, sender(event))
        except Exception as exc:  # a full disk, an unreadable dataset: the SCU may retry
            log.error("MPPS N-CREATE not stored", sop_instance_uid=uid, error=str(exc))
            return STATUS_PROCESSING_FAILURE, None
        log.info("MPPS step created", sop_instance_uid=uid, status=summary(attributes)["status"],
                 sender=sender(event))  # fmt: skip
        return status, (attributes if status == STATUS_SUCCESS else None)

    def on_set(event: Any) -> tuple[int, Dataset | None]:
        if not allowed(event):
            return STATUS_NOT_AUTHORIZED, None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            modifications = event.modification_list
            status = store.update(uid, modifications, sender(event))
        except Exception as exc:
            log.error("MPPS N-SET not stored", sop_instance_uid=uid, error=str(exc))
            return STATUS_PROCESSING_FAILURE, None
        if status == STATUS_SUCCESS:
            record = store.read(uid) or {}
            log.info("MPPS step updated", sop_instance_uid=uid, status=record.get("status"),
                     series=len(record.get("series") or {}))  # fmt: skip
        return status, (modifications if status == STATUS_SUCCESS else None)

    return [(evt.EVT_N_CREATE, on_create), (evt.EVT_N_SET, on_set)]


# -- the router's side ------------------------------------------------------------------------


@dataclass
class MppsIndex:
    """What the procedure steps say about series and studies, re-read once per router pass."""

    folder: Path
    keep_seconds: float = KEEP_SECONDS
    series_instances: dict[str, set[str]] = field(default_factory=dict)
    study_series: dict[str, set[str]] = field(default_factory=dict)
    study_instances: dict[str, set[str]] = field(default_factory=dict)
    study_open: set[str] = field(default_factory=set)
    _cache: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def refresh(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.series_instances = {}
        self.study_series = {}
        self.study_instances = {}
        self.study_open = set()
        if not self.folder.is_dir():
            return
        seen: set[str] = set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name[0] == ".":
                    continue
                seen.add(entry.name)
                try:
                    stamp = entry.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                cached = self._cache.get(entry.name)
                if cached is None or cached[0] != stamp:
                    try:
                        data = json.loads(Path(entry.path).read_bytes())
                    except (OSError, ValueError):
                        continue
                    cached = (stamp, data if isinstance(data, dict) else {})
                    self._cache[entry.name] = cached
                record = cached[1]
                if now - float(record.get("updated_at") or now) > self.keep_seconds:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    with contextlib.suppress(OSError):
                        os.unlink(self.folder / f".{entry.name[: -len('.json')]}.lock")
                    continue
                self._add(record)
        for name in set(self._cache) - seen:
            del self._cache[name]

    def _add(self, record: dict[str, Any]) -> None:
        completed = record.get("status") == COMPLETED
        series: dict[str, list[str]] = record.get("series") or {}
        names = {safe_component(i) + ".dcm" for listed in series.values() for i in listed}
        for study in record.get("studies") or []:
            if not completed:
                self.study_open.add(study)
            self.study_series.setdefault(study, set()).update(series)
            self.study_instances.setdefault(study, set()).update(names)
        if completed:
            for uid, instances in series.items():
                if instances:
                    names = {safe_component(i) + ".dcm" for i in instances}
                    key = safe_component(uid)  # as the spool names the series folder
                    self.series_instances.setdefault(key, set()).update(names)

    def series_complete(self, folder_name: str, present: set[str]) -> bool:
        """A COMPLETED step lists this series' instances, and every one of them is in."""
        expected = self.series_instances.get(folder_name)
        return bool(expected) and expected <= present  # type: ignore[operator]

    def study_complete(
        self, study_uid: str, received_series: set[str], present: set[str]
    ) -> set[str] | None:
        """The series the study's steps list, if every step is COMPLETED and every series
        and every listed instance of them is in (``present``: the study's instance files)."""
        if study_uid in self.study_open:
            return None
        listed = self.study_series.get(study_uid)
        if not listed or not listed <= received_series:
            return None
        if not self.study_instances.get(study_uid, set()) <= present:
            return None
        return listed


__all__ = ["MPPS_FOLDER", "MPPS_SOP_CLASS", "MppsIndex", "MppsStore", "add_context", "handlers"]
