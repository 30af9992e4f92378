"""The processor's job logic in-process: results, routing decisions, restarts at every step."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mercure.config import Config, ConfigError
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.processing import base as job_module
from mercure.processing import folders
from mercure.processing.job import JobRun
from mercure.processing.record import read_record
from mercure.processing.results import ResultError, decide_routing, read_result
from mercure.processing.selection import Runners
from mercure.services.processor import Processor
from mercure.services.router import evaluate_rules, plan_jobs
from mercure.services.runtime import Runtime, build_runtime
from mercure.testing import config_for, make_series, wait_for

MODULE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import pydicom
    from pydicom.uid import generate_uid
    in_dir, out_dir = Path(os.environ["MERCURE_IN_DIR"]), Path(os.environ["MERCURE_OUT_DIR"])
    task = json.loads((in_dir / "task.json").read_text())
    settings = task["process"]["settings"]
    with open(settings["runs"], "a") as fh:
        fh.write(task["process"]["module_name"] + "\\n")
    time.sleep(settings.get("sleep", 0))
    for path in sorted(in_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = settings.get("label", "out")
        ds.save_as(out_dir / f"{ds.SOPInstanceUID}.dcm")
    print("done", len(list(out_dir.glob("*.dcm"))))
    (out_dir / "result.json").write_text(json.dumps(settings.get("result", {"ok": True})))
    """
)


class Crash(BaseException):
    """A stand-in for kill -9 at one line: nothing after it runs."""


@pytest.fixture
def plugins() -> PluginManager:
    return build_plugin_manager(autoload=False)


def setup(tmp_path: Path, plugins: PluginManager, **overrides: Any) -> tuple[Config, Runtime, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "module.py"
    script.write_text(MODULE)
    runs = tmp_path / "runs.txt"
    archive = tmp_path / "archive"
    archive.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "targets": {"archive": {"target_type": "folder", "folder": str(archive)}},
        "modules": {
            "m": {"command": [sys.executable, str(script)], "settings": {"runs": str(runs)}},
            "n": {
                "command": [sys.executable, str(script)],
                "settings": {"runs": str(runs), "label": "second"},
            },
        },
        "rules": {
            "both": {
                "rule": "True",
                "action": "both",
                "target": "archive",
                "processing_module": "m",
                "processing_settings": {"label": "first"},
            }
        },
        "_registry": plugins.registry,
    }
    data.update(overrides)
    config = config_for(tmp_path, **data)
    runtime = build_runtime(config, plugins, fsync=False)
    return config, runtime, runs


def make_job(tmp_path: Path, runtime: Runtime, count: int = 3) -> JobRef:
    files = make_series(tmp_path / "series", count)
    from mercure.tags import read_tags

    tags = read_tags(str(files[0]))
    (planned,) = plan_jobs(runtime.config, tags, evaluate_rules(runtime.config, tags))
    return runtime.store.create("processing", Task.model_validate(planned.task), files)


def run_job(runtime: Runtime, ref: JobRef, stop: threading.Event | None = None) -> None:
    claim = runtime.store.claim(ref)
    assert claim is not None
    runners = Runners(runtime.config, runtime.plugins, runtime.context)
    try:
        with claim:
            JobRun(runtime, runners, ref, claim, stop or threading.Event()).run()
    finally:
        runners.close()


def test_router_merges_module_settings_with_the_rules(
    tmp_path: Path, plugins: PluginManager
) -> None:
    _config, runtime, runs = setup(
        tmp_path,
        plugins,
        rules={
            "chain": {
                "rule": "True",
                "action": "process",
                "processing_module": ["m", "n"],
                "processing_settings": [{"label": "x"}],
            }
        },
    )
    ref = make_job(tmp_path, runtime)
    task = runtime.store.read(ref)
    settings = [p.settings for p in folders.processes_of(task)]
    assert settings == [{"runs": str(runs), "label": "x"}, {"runs": str(runs), "label": "second"}]


@pytest.mark.parametrize(
    ("where", "after"),
    [
        ("prepare_step", True),
        ("launch", True),
        ("write_record", True),
        ("build_result", True),
        ("create", True),
        ("clear_inputs", True),
        ("place_result", False),
        ("place_result", True),
        ("notify", True),
        ("move", False),
    ],
)
def test_a_crash_at_any_step_resumes_without_running_or_dispatching_twice(
    tmp_path: Path,
    plugins: PluginManager,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    after: bool,
) -> None:
    _config, runtime, runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    crashed: list[str] = []

    def crashing(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if crashed:
                return original(*args, **kwargs)
            if not after:
                crashed.append(where)
                raise Crash(where)
            original(*args, **kwargs)
            crashed.append(where)
            raise Crash(where)

        return wrapper

    from mercure.builtin.local_runner import LocalRunner

    targets: dict[str, tuple[Any, str]] = {
        "prepare_step": (folders, "prepare_step"),
        "launch": (LocalRunner, "launch"),
        "write_record": (job_module, "write_record"),
        "build_result": (folders, "build_result"),
        "create": (type(runtime.store), "create"),
        "clear_inputs": (folders, "clear_inputs"),
        "place_result": (folders, "place_result"),
        "notify": (JobRun, "_notify_completion"),
        "move": (type(runtime.store), "move"),
    }
    owner, name = targets[where]
    monkeypatch.setattr(owner, name, crashing(getattr(owner, name)))
    with pytest.raises(Crash):
        run_job(runtime, ref)
    monkeypatch.undo()
    assert crashed == [where]
    current = runtime.store.find_exact(ref.id)
    assert current is not None
    if current.state == "processing":
        run_job(runtime, current)
    wait_for(lambda: runs.exists() and runs.read_text() == "m\n", timeout=10)

    done = runtime.store.find_exact(ref.id)
    assert done is not None and done.state == "success", done
    assert runs.read_text() == "m\n"  # the module ran once
    assert sorted(p.name for p in done.path.iterdir() if not p.name.endswith(".dcm")) == [
        ".lock",
        "logs",
        "processing.json",
        "result.json",
        "task.json",
    ]
    assert len(folders.dicom_outputs(done.path)) == 3
    record = read_record(done.path)
    assert record is not None and record.phase == "finished"
    outgoing = runtime.store.list(["outgoing"])
    assert [r.id for r in outgoing] == [record.dispatch_job]
    child = runtime.store.read(outgoing[0])
    assert child.parent_id == ref.id and child.target_names == ["archive"]
    assert len(folders.dicom_outputs(outgoing[0].path)) == 3


def test_a_stopping_processor_leaves_the_module_running_and_the_next_one_follows_it(
    tmp_path: Path, plugins: PluginManager
) -> None:
    _config, runtime, runs = setup(
        tmp_path,
        plugins,
        modules={
            "m": {
                "command": [sys.executable, str(tmp_path / "module.py")],
                "settings": {"runs": str(tmp_path / "runs.txt"), "sleep": 2},
            }
        },
    )
    ref = make_job(tmp_path, runtime)
    stop = threading.Event()
    worker = threading.Thread(target=run_job, args=(runtime, ref, stop))
    worker.start()
    wait_for(lambda: runs.exists(), timeout=20, what="the module to start")
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    record = read_record(ref.path)
    assert record is not None and record.steps[0].state == "running"
    assert runtime.store.find_exact(ref.id).state == "processing"  # type: ignore[union-attr]
    run_job(runtime, ref)
    done = runtime.store.find_exact(ref.id)
    assert done is not None and done.state == "success"
    assert runs.read_text() == "m\n"


def test_an_unavailable_runner_is_launched_again_then_the_job_runs(
    tmp_path: Path, plugins: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mercure.builtin.local_runner import LocalRunner
    from mercure.processing.job import LaunchLater
    from mercure.runners import RunnerUnavailable

    _config, runtime, runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    original = LocalRunner.launch
    outages = ["engine restarting", "engine restarting"]

    def flaky(self: LocalRunner, run: Any) -> str:
        if outages:
            raise RunnerUnavailable(outages.pop())
        return original(self, run)

    monkeypatch.setattr(LocalRunner, "launch", flaky)
    for _ in range(2):
        with pytest.raises(LaunchLater) as later:
            run_job(runtime, ref)
        assert 2.0 <= later.value.delay <= 60.0
        record = read_record(ref.path)
        assert record is not None and record.steps[0].state == "launching"
        assert record.steps[0].error == "waiting for the runner: engine restarting"
        assert runtime.store.find_exact(ref.id).state == "processing"  # type: ignore[union-attr]
    run_job(runtime, ref)
    done = runtime.store.find_exact(ref.id)
    assert done is not None and done.state == "success"
    assert runs.read_text() == "m\n"
    record = read_record(done.path)
    assert record is not None
    assert record.steps[0].unavailable_since is None and record.steps[0].error is None


def test_a_runner_unavailable_past_the_patience_fails_the_job(
    tmp_path: Path, plugins: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mercure.builtin.local_runner import LocalRunner
    from mercure.processing import job as job_run
    from mercure.runners import RunnerUnavailable

    _config, runtime, _runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)

    def down(self: LocalRunner, run: Any) -> str:
        raise RunnerUnavailable("cannot reach the engine")

    monkeypatch.setattr(LocalRunner, "launch", down)
    monkeypatch.setattr(job_run, "LAUNCH_PATIENCE", 0.0)
    run_job(runtime, ref)
    failed = runtime.store.find_exact(ref.id)
    assert failed is not None and failed.state == "error"
    error = runtime.store.read(failed).error or ""
    assert "stayed unavailable" in error and "cannot reach the engine" in error


def test_the_processor_pauses_a_job_whose_runner_is_unavailable(
    tmp_path: Path, plugins: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mercure.builtin.local_runner import LocalRunner
    from mercure.runners import RunnerUnavailable

    _config, runtime, _runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    tries: list[float] = []

    def down(self: LocalRunner, run: Any) -> str:
        tries.append(1.0)
        raise RunnerUnavailable("engine restarting")

    monkeypatch.setattr(LocalRunner, "launch", down)
    processor = Processor(runtime)
    try:
        assert processor.run_once() == 1
        wait_for(lambda: ref.id in processor.pause_until, timeout=10, what="the pause")
        assert processor.run_once() == 0  # paused: not taken again at once
        assert len(tries) == 1
    finally:
        processor.close()
    assert runtime.store.find_exact(ref.id).state == "processing"  # type: ignore[union-attr]


def test_logs_are_kept_with_the_job_in_the_file_store_or_nowhere(
    tmp_path: Path, plugins: PluginManager
) -> None:
    store = tmp_path / "logstore"
    _config, runtime, _runs = setup(
        tmp_path / "a", plugins, processing_logs={"logs_file_store": str(store)}
    )
    ref = make_job(tmp_path / "a", runtime)
    run_job(runtime, ref)
    done = runtime.store.find_exact(ref.id)
    assert done is not None
    record = read_record(done.path)
    assert record is not None and "done 3" in record.steps[0].log_tail
    assert "done 3" in (done.path / "logs" / "1.0.m.log").read_text()
    assert "done 3" in (store / ref.id / "1.0.m.txt").read_text()

    _config, runtime, _runs = setup(tmp_path / "b", plugins, processing_logs={"discard_logs": True})
    ref = make_job(tmp_path / "b", runtime)
    run_job(runtime, ref)
    done = runtime.store.find_exact(ref.id)
    assert done is not None
    record = read_record(done.path)
    assert record is not None and record.steps[0].log_tail == ""
    assert not (done.path / "logs").exists()


def test_halt_suspends_the_processor(tmp_path: Path, plugins: PluginManager) -> None:
    _config, runtime, runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    halt = runtime.store.folders["processing"] / "HALT"
    halt.touch()
    processor = Processor(runtime)
    try:
        assert processor.run_once() == 0
        assert not runs.exists() and read_record(ref.path) is None
        halt.unlink()
        assert processor.run_once() == 1
        wait_for(lambda: (runtime.store.folders["success"] / ref.id).is_dir(), timeout=30)
    finally:
        processor.stop()


def test_result_json_must_be_json_with_well_formed_directives(tmp_path: Path) -> None:
    assert read_result(tmp_path) == (False, None)
    (tmp_path / "result.json").write_text('{"score": 0.9, "__mercure_notification": {"text": "a"}}')
    assert read_result(tmp_path) == (True, {"score": 0.9, "__mercure_notification": {"text": "a"}})
    for bad, message in (
        ("{nope", "not valid JSON: Expecting property name"),
        ('{"__mercure_routing": ["a"]}', "__mercure_routing must be an object"),
        ('{"__mercure_routing": {"target": 3}}', "target must be a target name"),
        ('{"__mercure_notification": {"requested": "yes"}}', "requested must be true or false"),
    ):
        (tmp_path / "result.json").write_text(bad)
        with pytest.raises(ResultError, match=message):
            read_result(tmp_path)


def test_dynamic_routing_follows_mercure(tmp_path: Path, plugins: PluginManager) -> None:
    folder = {"target_type": "folder", "folder": str(tmp_path)}
    config = config_for(
        tmp_path,
        _registry=plugins.registry,
        targets={"a": folder, "b": folder, "c": folder},
        rules={
            "on": {
                "rule": "True",
                "target": "a",
                "dynamic_routing": True,
                "dynamic_routing_allowed_targets": ["b"],
            },
            "open": {"rule": "True", "target": "a", "dynamic_routing": True},
            "off": {"rule": "True", "target": "a"},
        },
    )

    def decide(rule: str, directive: Any) -> tuple[list[str], str | None]:
        decision = decide_routing(config, rule, ["a"], {"__mercure_routing": directive})
        return decision.targets, decision.note

    assert decide("on", {"target": "b"})[0] == ["b"]
    targets, note = decide("on", {"target": ["c"]})
    assert targets == ["a"] and note is not None and "refused: c not in" in note
    assert decide("open", {"target": ["b", "c"]})[0] == ["b", "c"]  # no list: any target
    targets, note = decide("open", {"target": "missing"})
    assert targets == ["a"] and note is not None and "not configured" in note
    assert decide("on", {"discard": True})[0] == []
    targets, note = decide("off", {"target": "b"})
    assert targets == ["a"] and note is not None and "does not enable dynamic_routing" in note
    assert decide_routing(config, "on", ["a"], [1, 2]).targets == ["a"]


def test_config_check_reports_modules_the_runner_cannot_run(
    tmp_path: Path, plugins: PluginManager
) -> None:
    with pytest.raises(ConfigError) as info:
        config_for(
            tmp_path,
            _registry=plugins.registry,
            process_runner="local",
            modules={
                "ai": {"docker_tag": "x/ai:1"},
                "env": {"command": "/bin/true", "environment": "{not json"},
                "unused": {"docker_tag": "x/unused:1"},
            },
            rules={"p": {"rule": "True", "action": "process", "processing_module": ["ai", "env"]}},
        )
    errors = dict(info.value.errors)
    # A configured runner is asked about every module, used or not.
    assert set(errors) == {
        "modules.ai.command",
        "modules.unused.command",
        "modules.env.environment",
    }
    assert "mercure-runner-docker" in errors["modules.ai.command"]
    assert "(runner 'local')" in errors["modules.unused.command"]


def test_a_mercure_configuration_with_container_modules_loads_with_a_warning(
    tmp_path: Path, plugins: PluginManager
) -> None:
    """mercure's empty process_runner means Docker; with the core alone that is a warning."""
    from mercure.config import validate_config

    data = {
        "modules": {"ai": {"docker_tag": "x/ai:1"}, "bare": {}},
        "rules": {"p": {"rule": "True", "action": "process", "processing_module": "ai"}},
    }
    _config, warnings = validate_config(data, plugins.registry)
    (warning,) = [w for w in warnings if w.startswith("modules.ai")]
    assert "process_runner" in warning and "mercure-runner-docker" in warning
    data["rules"]["p"]["processing_module"] = "bare"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"modules\.bare\.command: no command"):
        validate_config(data, plugins.registry)


def test_unreadable_task_and_missing_module_end_in_error(
    tmp_path: Path, plugins: PluginManager
) -> None:
    _config, runtime, runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    task = runtime.store.read(ref)
    task.process = task.process.model_copy(  # type: ignore[union-attr]
        update={"module_name": "gone", "module_config": None}
    )
    runtime.store.write(ref, task)
    run_job(runtime, ref)
    failed = runtime.store.find_exact(ref.id)
    assert failed is not None and failed.state == "error"
    task = runtime.store.read(failed)
    assert task.error is not None and "module 'gone'" in task.error
    assert task.info.fail_stage == "PROCESSING"
    assert not runs.exists()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("process"):
            thread.join(5)


def test_module_task_json_is_mercure_compatible(tmp_path: Path, plugins: PluginManager) -> None:
    """The module's task.json has only mercure's top-level keys (its Task forbids others)."""
    _config, runtime, runs = setup(tmp_path, plugins)
    ref = make_job(tmp_path, runtime)
    task = runtime.store.read(ref)
    data = folders.module_task(task, folders.processes_of(task)[0])
    assert set(data) == {"id", "info", "dispatch", "process", "study", "nomad_info"}
    assert set(data["dispatch"]) == {"target_name", "retries", "next_retry_at", "series_uid"}
    assert data["process"]["settings"] == {"runs": str(runs), "label": "first"}
    json.dumps(data)
