"""A site plugin for the end-to-end tests: a folder-like target that fails on request.

Configured as ``{"target_type": "e2e_flaky", "folder": ..., "journal": ...}``:

* while ``down_flag`` names a file that exists, every send raises ``TargetError``;
* while ``fail_list`` names a file that exists, the instance files listed in it (one name a
  line) are reported failed, the others are copied to ``<folder>/<task id>/``;
* every call appends one JSON line to ``journal``: the task id, the files it was asked to
  send, and those it delivered, so a test can count deliveries per instance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from mercure import hookimpl
from mercure.registry import RegisterFn
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig, TargetError


class FlakyTargetConfig(TargetConfig):
    target_type: Literal["e2e_flaky"] = "e2e_flaky"
    folder: str
    journal: str
    down_flag: str = ""
    fail_list: str = ""


class FlakyTarget(Target[FlakyTargetConfig]):
    def send(self, job: DeliveryJob) -> DeliveryResult:
        cfg = self.config
        asked = [f.name for f in job.files]
        if cfg.down_flag and Path(cfg.down_flag).exists():
            self._journal(job.task_id, asked, [], "down")
            raise TargetError(f"test target is down while {cfg.down_flag} exists")
        failing: set[str] = set()
        if cfg.fail_list:
            try:
                failing = set(Path(cfg.fail_list).read_text().split())
            except FileNotFoundError:
                failing = set()
        dest = Path(cfg.folder) / job.task_id
        dest.mkdir(parents=True, exist_ok=True)
        result = DeliveryResult()
        for src in job.files:
            if src.name in failing:
                result.failed[src.name] = "refused by the test target"
                continue
            tmp = dest / f".part-{src.name}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest / src.name)
            result.delivered.append(src.name)
        self._journal(job.task_id, asked, result.delivered, "sent")
        return result

    def _journal(self, task_id: str, asked: list[str], delivered: list[str], what: str) -> None:
        line = json.dumps(
            {"task_id": task_id, "what": what, "asked": asked, "delivered": delivered}
        )
        fd = os.open(self.config.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("e2e_flaky", FlakyTargetConfig, FlakyTarget)
