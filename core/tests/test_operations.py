"""Operator actions shared by the CLI and the web dashboard, and services added by plugins."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from mercure import hookimpl
from mercure.controls import halt_file, is_suspended, suspended_by
from mercure.events import TaskEvent
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, read_task
from mercure.operations import (
    OperationError,
    discard_job,
    resume_service,
    retry_job,
    suspend_service,
)
from mercure.plugin_services import PluginService
from mercure.plugin_settings import PluginSettings
from mercure.plugins import PluginManager
from mercure.services.runtime import build_runtime
from mercure.services.supervisor import SERVICES, Supervisor
from mercure.testing import config_for, make_series, start_router, wait_for


class Recorder:
    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        self.events.append(event)


def error_job(config: Any, task_id: str, tmp_path: Path) -> Path:
    folder = config.folder("error") / task_id
    files = make_series(folder, 2)
    task = Task(
        id=task_id,
        info=TaskInfo(action="route", uid=files[0].stem, triggered_rules={"all": True}),
        dispatch=TaskDispatch(target_name=["folder"], retries=5, next_retry_at=1.0),
        error="gave up after 5 tries: the PACS refused",
    )
    (folder / "task.json").write_text(task.model_dump_json())
    return folder


@pytest.fixture
def setup(tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any) -> Any:
    (tmp_path / "target").mkdir()
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(tmp_path / "target")}},
        rules={"all": {"rule": "True", "target": "folder"}},
        _registry=plugin_manager.registry,
    )
    recorder = Recorder()
    register_plugin(recorder, "recorder")
    return config, build_runtime(config, plugin_manager, fsync=False), recorder


def test_retry_and_discard_record_the_operator(setup: Any, tmp_path: Path) -> None:
    config, runtime, recorder = setup
    for state in ("outgoing", "success", "discard"):
        config.folder(state).mkdir(parents=True, exist_ok=True)
    error_job(config, "job-a", tmp_path)
    error_job(config, "job-b", tmp_path)
    outcome = retry_job(runtime, "job-a", operator="alice", by="web")
    assert outcome.task_id == "job-a" and "outgoing/" in outcome.message
    task = read_task(config.folder("outgoing") / "job-a")
    assert task.error is None and task.dispatch_state and task.dispatch_state.retries == 0
    assert "(by alice)" in task.history[-1]
    discard_job(runtime, "job-b", operator="bob", reason="sent twice", by="web")
    moved = read_task(config.folder("discard") / "job-b")
    assert "discarded by bob: sent twice" in moved.history[-1]
    kinds = [(str(e.type), e.task_id, e.extra.get("operator"), e.extra.get("by"))
             for e in recorder.events]  # fmt: skip
    assert kinds == [("retry", "job-a", "alice", "web"), ("manual_discard", "job-b", "bob", "web")]
    with pytest.raises(OperationError, match="is in outgoing/, not error/"):
        retry_job(runtime, "job-a", operator="alice")
    with pytest.raises(OperationError, match="no job 'nope'"):
        discard_job(runtime, "nope", operator="alice")
    assert (config.folder("outgoing") / "job-a").is_dir()  # a refusal changed nothing


def test_suspend_holds_new_deliveries_until_resumed(
    tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        _registry=plugin_manager.registry,
    )
    recorder = Recorder()
    register_plugin(recorder, "recorder")
    runtime = build_runtime(config, plugin_manager, fsync=False)
    config.folder("outgoing").mkdir(parents=True, exist_ok=True)
    first = suspend_service(runtime, "dispatching", operator="carol", reason="PACS down")
    assert "suspended" in first.message and is_suspended(config, "dispatching")
    assert suspended_by(config, "dispatching") is not None
    assert (suspended_by(config, "dispatching") or {})["by"] == "carol"
    assert "already" in suspend_service(runtime, "dispatching", operator="carol").message
    with pytest.raises(OperationError, match="cannot suspend 'routing'"):
        suspend_service(runtime, "routing", operator="carol")
    from mercure.testing import dcmtk_storescu

    gen = start_router(config, plugin_manager)
    router = next(gen)
    try:
        dcmtk_storescu(make_series(tmp_path / "in", 3), router.port)
        wait_for(lambda: router.jobs("outgoing") == 1, 30, what="the job waiting in outgoing/")
        # Held: the dispatcher sees the job (and the HALT file beside it) and starts nothing.
        threading.Event().wait(3 * config.dispatcher_scan_interval)
        assert router.jobs("outgoing") == 1 and router.jobs("success") == 0
        assert resume_service(runtime, "dispatching", operator="carol").message == (
            "dispatching resumed"
        )
        assert not halt_file(config, "dispatching").exists()
        wait_for(lambda: router.jobs("success") == 1, 30, what="the job delivered after resume")
    finally:
        gen.close()
    kinds = [(str(e.type), e.extra.get("service"), e.extra.get("operator"))
             for e in recorder.events if not e.task_id]  # fmt: skip
    assert kinds == [("suspend", "dispatching", "carol"), ("resume", "dispatching", "carol")]


class EchoSettings(PluginSettings):
    greeting: str = "hello"


class EchoService(PluginService[EchoSettings]):
    started: list[str] = []
    closed: list[str] = []

    def start(self) -> None:
        assert self.runtime.config is not None
        EchoService.started.append(f"{self.name}:{self.settings.greeting}")

    def close(self) -> None:
        EchoService.closed.append(self.name)


class EchoPlugin:
    @hookimpl
    def register_services(self, register: Any) -> None:
        register("echo", EchoSettings, EchoService)


def test_plugin_services_start_with_the_router(tmp_path: Path) -> None:
    manager = PluginManager()
    manager.register(EchoPlugin(), "echo_plugin")
    manager.load_builtins()
    EchoService.started.clear()
    EchoService.closed.clear()
    config = config_for(
        tmp_path,
        plugins={"services": {"hi": {"type": "echo", "greeting": "moin"}}},
        _registry=manager.registry,
    )
    runtime = build_runtime(config, manager, fsync=False)
    supervisor = Supervisor(runtime)
    assert supervisor.names == [*SERVICES, "hi"]
    only = Supervisor(build_runtime(config, manager, fsync=False), ["echo"])
    only.start()
    only.stop()
    assert EchoService.started == ["echo:hello"] and EchoService.closed == ["echo"]
    with pytest.raises(ValueError, match="unknown service"):
        Supervisor(runtime, ["web"])
    with pytest.raises(Exception, match="greeting"):
        config_for(
            tmp_path,
            plugins={"services": {"hi": {"type": "echo", "greeting": 3}}},
            _registry=manager.registry,
        )
