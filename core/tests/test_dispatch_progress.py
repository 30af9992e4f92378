"""Progress a target confirms during a send is kept, even when the send then fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from mercure import hookimpl
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, read_task
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn
from mercure.services.dispatcher import Dispatcher
from mercure.services.runtime import build_runtime
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig, TargetError
from mercure.testing import config_for


class HalfwayPlugin:
    """Target type ``halfway``: confirms the first two files, then the connection "drops"."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.on_disk_after_confirm: list[str] = []
        self.fail = True

    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        plugin = self

        class HalfwayConfig(TargetConfig):
            target_type: Literal["halfway"] = "halfway"

        class Halfway(Target[HalfwayConfig]):
            def send(self, job: DeliveryJob) -> DeliveryResult:
                names = [f.name for f in job.files]
                plugin.sent.append(names)
                if not plugin.fail:
                    return DeliveryResult.all_delivered(job)
                assert job.confirm is not None
                job.confirm(names[:2])
                task = read_task(job.folder)
                assert task.dispatch_state is not None
                plugin.on_disk_after_confirm = task.dispatch_state.delivered.get(self.name, [])
                raise TargetError("association aborted by the peer")

        register("halfway", HalfwayConfig, Halfway)


def test_confirmed_files_are_recorded_at_once_and_not_sent_again(
    tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any
) -> None:
    plugin = HalfwayPlugin()
    register_plugin(plugin, "halfway")
    config = config_for(
        tmp_path,
        targets={"h": {"target_type": "halfway"}},
        _registry=plugin_manager.registry,
    )
    runtime = build_runtime(config, plugin_manager, fsync=False)
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(5):
        path = src / f"1.2.{i}.dcm"
        path.write_bytes(b"x%d" % i)
        files.append(path)
    task = Task(
        info=TaskInfo(action="route", uid="1.2", mrn="M", acc="A"),
        id="job",
        dispatch=TaskDispatch(target_name="h", series_uid="1.2"),
    )
    ref = runtime.store.create("outgoing", task, files)
    dispatcher = Dispatcher(runtime)
    try:
        dispatcher.deliver(ref)
        names = [f.name for f in files]
        # The confirmation reached task.json while the send was still under way.
        assert plugin.on_disk_after_confirm == names[:2]
        after = read_task(ref.path)
        assert after.dispatch_state is not None
        assert after.dispatch_state.delivered == {"h": names[:2]}
        assert after.dispatch_state.retries == 1

        plugin.fail = False
        after.dispatch_state.next_retry_at = 0
        runtime.store.write(ref, after)
        dispatcher.deliver(ref)
        assert plugin.sent[-1] == names[2:]
        done = runtime.store.find_exact("job")
        assert done is not None and done.state == "success"
    finally:
        dispatcher.stop()
