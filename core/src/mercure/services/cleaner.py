"""The cleaner: deletes delivered and discarded jobs after the retention period.

As in mercure, that regular pass runs only off-peak (``offpeak_start..offpeak_end`` in
``local_time``), when cleaning I/O does not compete with images arriving and leaving.
``error/`` is never touched (an operator decides), nor anything not yet delivered. When the
disk passes ``emergency_clean_percentage``, the oldest delivered jobs in ``success/`` go first,
before their retention ends; discarded and undelivered data stay.
"""

from __future__ import annotations

import shutil
import time

from mercure.jobs.store import JobRef
from mercure.priorities import OffpeakWindow
from mercure.services.base import Service
from mercure.services.runtime import Runtime


class Cleaner(Service):
    name = "cleaner"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.config.cleaner_scan_interval)
        self.runtime = runtime
        #: The clock of the off-peak check (tests set it).
        self.clock = time.time

    @property
    def window(self) -> OffpeakWindow:
        """The off-peak window of the running configuration (it may be reloaded)."""
        return OffpeakWindow.from_config(self.runtime.config)

    def run_once(self) -> int:
        store = self.runtime.store
        config = self.runtime.config
        now = time.time()
        removed = 0
        if self.window.contains(self.clock()):
            for ref in store.list(("success", "discard")):
                if store.age(ref, now) >= config.retention:
                    removed += self._remove(ref)
        removed += self.emergency_clean()
        self.runtime.spool.clean_tmp()
        store.clean_staging()
        if removed:
            self.log.info("old jobs removed", count=removed)
        return 0  # never loop immediately: cleaning is not urgent

    def disk_usage_percent(self) -> float:
        usage = shutil.disk_usage(self.runtime.store.folders["success"])
        return 100.0 * usage.used / usage.total if usage.total else 0.0

    def emergency_clean(self) -> int:
        """Delete the oldest delivered jobs while the disk is fuller than the configured limit."""
        limit = self.runtime.config.emergency_clean_percentage
        if self.disk_usage_percent() < limit:
            return 0
        store = self.runtime.store
        refs = sorted(store.list(("success",)), key=lambda r: -store.age(r))
        removed = 0
        for ref in refs:
            if self.disk_usage_percent() < limit:
                break
            removed += self._remove(ref)
        if removed:
            self.log.warning(
                "emergency clean: delivered jobs removed before their retention",
                count=removed,
                limit_percent=limit,
            )
        return removed

    def _remove(self, ref: JobRef) -> int:
        claim = self.runtime.store.claim(ref)
        if claim is None:
            return 0
        with claim:
            self.runtime.store.delete(ref)
        return 1
