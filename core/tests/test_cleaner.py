"""The cleaner: retention of delivered and discarded jobs; emergency clean of success/ only."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import pytest
from mercure.jobs.store import STAGING_PREFIX, JobStore, State
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.plugins import PluginManager
from mercure.services.cleaner import Cleaner
from mercure.services.runtime import build_runtime
from mercure.testing import config_for

DAY = 86400
OFFPEAK = datetime(2026, 1, 15, 23, 30).timestamp()  # inside 22:00-06:00, host time


def test_the_regular_pass_waits_for_offpeak(cleaner: Cleaner, tmp_path: Path) -> None:
    store = cleaner.runtime.store
    job = add(store, "success", "daytime", 4 * DAY, tmp_path)
    cleaner.clock = lambda: datetime(2026, 1, 15, 14, 0).timestamp()
    cleaner.run_once()
    assert job.exists()  # past its retention, but it is 14:00
    cleaner.clock = lambda: OFFPEAK
    cleaner.run_once()
    assert not job.exists()


@pytest.fixture
def cleaner(tmp_path: Path, plugin_manager: PluginManager) -> Cleaner:
    config = config_for(
        tmp_path,
        retention=3 * DAY,
        emergency_clean_percentage=90,
        _registry=plugin_manager.registry,
    )
    cleaner = Cleaner(build_runtime(config, plugin_manager, fsync=False))
    cleaner.clock = lambda: OFFPEAK  # the regular pass runs off-peak only
    return cleaner


def add(store: JobStore, state: State, task_id: str, age: float, tmp_path: Path) -> Path:
    src = tmp_path / "src" / task_id
    src.mkdir(parents=True)
    (src / "1.2.3.dcm").write_bytes(b"instance")
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3", mrn="M", acc="A"),
        id=task_id,
        dispatch=TaskDispatch(target_name="t"),
    )
    ref = store.create(state, task, [src / "1.2.3.dcm"])
    then = time.time() - age
    os.utime(ref.path, (then, then))
    return ref.path


def remaining(store: JobStore) -> set[str]:
    return {f"{r.state}/{r.id}" for r in store.list()}


def test_jobs_past_retention_are_deleted(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 10.0)
    store = cleaner.runtime.store
    for state in ("success", "discard", "error", "outgoing", "processing"):
        add(store, state, f"{state}-old", 4 * DAY, tmp_path)
        add(store, state, f"{state}-new", 1 * DAY, tmp_path)
    cleaner.run_once()
    assert remaining(store) == {
        "success/success-new",
        "discard/discard-new",
        "error/error-old",
        "error/error-new",
        "outgoing/outgoing-old",
        "outgoing/outgoing-new",
        "processing/processing-old",
        "processing/processing-new",
    }
    assert not (store.folders["success"] / "success-old").exists()


def test_retention_counts_from_arrival_in_success(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job created long ago but delivered just now is kept for the whole retention."""
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 10.0)
    store = cleaner.runtime.store
    add(store, "outgoing", "late", 10 * DAY, tmp_path)
    ref = store.find_exact("late")
    assert ref is not None
    store.move(ref, "success")
    cleaner.run_once()
    assert remaining(store) == {"success/late"}


def test_a_claimed_job_is_not_deleted(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 10.0)
    store = cleaner.runtime.store
    add(store, "success", "busy", 4 * DAY, tmp_path)
    ref = store.find_exact("busy")
    assert ref is not None
    claim = store.claim(ref)
    assert claim is not None
    with claim:
        cleaner.run_once()
        assert remaining(store) == {"success/busy"}
    cleaner.run_once()
    assert remaining(store) == set()


def test_emergency_clean_deletes_oldest_success_jobs_first(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cleaner.runtime.store
    for i, age in enumerate([5.0, 40.0, 20.0, 10.0]):  # all within the retention
        add(store, "success", f"s{i}", age * 60, tmp_path)
    add(store, "discard", "d", 3600, tmp_path)
    add(store, "error", "e", 3600, tmp_path)

    def usage(self: Cleaner) -> float:
        # Each delivered job takes 5 % of the disk.
        return 80.0 + 5.0 * len(store.list(("success",)))

    monkeypatch.setattr(Cleaner, "disk_usage_percent", usage)
    assert cleaner.emergency_clean() == 3
    # The youngest delivered job is kept once the disk is below the limit.
    assert remaining(store) == {"success/s0", "discard/d", "error/e"}


def test_emergency_clean_never_touches_other_states(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cleaner.runtime.store
    add(store, "success", "s", 60, tmp_path)
    for state in ("discard", "error", "outgoing", "processing"):
        add(store, state, state, 60, tmp_path)
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 99.0)
    cleaner.run_once()
    assert remaining(store) == {
        "discard/discard",
        "error/error",
        "outgoing/outgoing",
        "processing/processing",
    }


def test_no_emergency_clean_below_the_limit(
    cleaner: Cleaner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cleaner.runtime.store
    add(store, "success", "s", 60, tmp_path)
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 89.9)
    assert cleaner.emergency_clean() == 0
    assert remaining(store) == {"success/s"}


def test_cleaner_removes_dead_staging_folders_and_old_tmp_files(
    cleaner: Cleaner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Cleaner, "disk_usage_percent", lambda self: 10.0)
    store = cleaner.runtime.store
    staging = store.folders["outgoing"] / f"{STAGING_PREFIX}dead"
    staging.mkdir()
    (staging / "1.dcm").write_bytes(b"x")
    tmp_file = cleaner.runtime.spool.tmp / ".tmp-dead"
    tmp_file.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(tmp_file, (old, old))
    cleaner.run_once()
    assert not staging.exists()
    assert not tmp_file.exists()


def test_disk_usage_is_a_percentage(cleaner: Cleaner) -> None:
    assert 0.0 < cleaner.disk_usage_percent() <= 100.0
