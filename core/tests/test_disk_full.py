"""A full spool disk: the services must keep making room instead of locking up.

Found by the fault-injection scenario ``disk-full`` (``tests/chaos``): with the disk full to
the last byte, a dispatcher that could not record a delivery sent the same job again and
again, and a router that could not create one series' job stopped routing every other series,
so no job ever completed and the cleaner never freed anything.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Literal

import pytest
from mercure import hookimpl
from mercure.jobs.incoming import IncomingSpool
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn
from mercure.services.dispatcher import Dispatcher
from mercure.services.router import Router
from mercure.services.runtime import Runtime, build_runtime
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig
from mercure.testing import config_for


def disk_full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Counting:
    """Target type ``counting``: delivers everything and records what it was handed."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        plugin = self

        class CountingConfig(TargetConfig):
            target_type: Literal["counting"] = "counting"

        class CountingTarget(Target[CountingConfig]):
            def send(self, job: DeliveryJob) -> DeliveryResult:
                plugin.sent.extend(f.name for f in job.files)
                return DeliveryResult.all_delivered(job)

        register("counting", CountingConfig, CountingTarget)


@pytest.fixture
def counting(register_plugin: Any) -> Counting:
    plugin = Counting()
    register_plugin(plugin, "counting")
    return plugin


@pytest.fixture
def runtime(tmp_path: Path, plugin_manager: PluginManager, counting: Counting) -> Runtime:
    config = config_for(
        tmp_path,
        targets={"t": {"target_type": "counting"}},
        rules={"all": {"rule": "True", "target": "t"}},
        series_complete_trigger=0,
        _registry=plugin_manager.registry,
    )
    return build_runtime(config, plugin_manager, fsync=False)


def add_job(rt: Runtime, count: int = 3) -> JobRef:
    src = rt.config.folder("incoming").parent / "src"
    src.mkdir(parents=True)
    files = []
    for i in range(count):
        f = src / f"1.2.3.{i}.dcm"
        f.write_bytes(b"instance %d" % i)
        files.append(f)
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="t", series_uid="1.2.3"),
    )
    return rt.store.create("outgoing", task, files)


def test_a_delivered_job_moves_to_success_when_its_task_file_cannot_be_written(
    runtime: Runtime, counting: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = add_job(runtime)
    monkeypatch.setattr(runtime.store, "write", disk_full)
    dispatcher = Dispatcher(runtime)
    try:
        dispatcher.deliver(ref)
    finally:
        dispatcher.pool.shutdown(wait=True)
    found = runtime.store.find_exact("job-1")
    assert found is not None and found.state == "success"
    # Sent once: the job is not handed to the target again for want of a few bytes.
    assert sorted(counting.sent) == ["1.2.3.0.dcm", "1.2.3.1.dcm", "1.2.3.2.dcm"]


def test_a_series_that_cannot_be_routed_does_not_hold_up_the_others(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    for series in ("1.2.3", "1.2.4"):
        tags = {"SeriesInstanceUID": series, "Modality": "CT"}
        runtime.spool.store(series, f"{series}.1", [b"DICM instance"], tags)
    create = runtime.store.create

    def create_or_full(state: Any, task: Task, files: Any, **kwargs: Any) -> JobRef:
        if task.info.uid == "1.2.3":
            disk_full()
        return create(state, task, files, **kwargs)

    monkeypatch.setattr(runtime.store, "create", create_or_full)
    router = Router(runtime)
    router.run_once()
    routed = {runtime.store.read(ref).info.uid for ref in runtime.store.list(("outgoing",))}
    assert routed == {"1.2.4"}
    assert len(runtime.spool.taken()) == 1  # 1.2.3 waits for space, taken and planned

    monkeypatch.setattr(runtime.store, "create", create)
    router.run_once()
    routed = {runtime.store.read(ref).info.uid for ref in runtime.store.list(("outgoing",))}
    assert routed == {"1.2.3", "1.2.4"}
    assert runtime.spool.taken() == []


def test_series_tags_that_cannot_be_written_leave_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = IncomingSpool(tmp_path / "incoming", fsync=True)
    series_dir = spool.folder / "1.2.3"
    series_dir.mkdir()
    monkeypatch.setattr("mercure.jobs.incoming.os.fdatasync", disk_full)
    with pytest.raises(OSError):
        spool._write_tags(series_dir, {"SeriesInstanceUID": "1.2.3"})
    assert os.listdir(spool.tmp) == []
