"""Study jobs: collection per study rule, the release triggers, force completion, crashes.

The releaser is driven with an injected clock (``run_once(now=...)``) so that no test sleeps
through a study timeout; series reach the spool as a receiver stores them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mercure.config import Config
from mercure.events import TaskEventType
from mercure.jobs import studies as study_jobs
from mercure.jobs.incoming import instance_files
from mercure.jobs.store import STATES
from mercure.jobs.studies import FORCE_COMPLETE, StudyStore, collection_name
from mercure.jobs.task import Task, TaskStudy, read_task
from mercure.plugins import PluginManager
from mercure.services.router import Router
from mercure.services.runtime import Runtime, build_runtime
from mercure.testing import config_for
from task_recorder import Recorder

STUDY = "1.2.826.0.1.3680043.8.498.100"
HOUR = 3600.0


def study_rule(**fields: Any) -> dict[str, Any]:
    return {"rule": "True", "target": "a", "action_trigger": "study", **fields}


def runtime(
    tmp_path: Path, plugin_manager: PluginManager, rules: dict[str, Any], **overrides: Any
) -> Runtime:
    overrides.setdefault("series_complete_trigger", 0)
    overrides.setdefault("study_complete_trigger", 900)
    overrides.setdefault("study_forcecomplete_trigger", 5400)
    if "recording" in plugin_manager.registry.names("notifier"):
        overrides.setdefault("plugins", {"notifiers": {"recording": {}}})
    config: Config = config_for(
        tmp_path,
        targets={"a": {"target_type": "folder", "folder": str(tmp_path / "target-a")}},
        rules=rules,
        modules={"ai": {"command": "{python} -c pass"}},
        _registry=plugin_manager.registry,
        **overrides,
    )
    return build_runtime(config, plugin_manager, fsync=False)


def receive(rt: Runtime, description: str, count: int = 2, study: str = STUDY) -> list[str]:
    """Store one series of ``study`` as a receiver does; returns the instance file names."""
    series = f"{study}.{abs(hash(description)) % 10**8}"
    tags = {
        "SeriesInstanceUID": series,
        "StudyInstanceUID": study,
        "SeriesDescription": description,
        "Modality": "MR",
        "PatientID": "MRN1",
    }
    names = []
    for i in range(count):
        rt.spool.store(series, f"{series}.{i + 1}", [b"DICM %d" % i], tags)
        names.append(f"{series}.{i + 1}.dcm")
    return names


def collecting(rt: Runtime) -> list[Task]:
    store = StudyStore(rt.config.folder("studies"), rt.store)
    return [read_task(ref.path) for ref in store.entries()]


def jobs_in(rt: Runtime, state: str) -> list[tuple[Path, Task]]:
    return [(ref.path, read_task(ref.path)) for ref in rt.store.list([state])]  # type: ignore[list-item]


def study_of(task: Task) -> TaskStudy:
    assert isinstance(task.study, TaskStudy)
    return task.study


SERIES_RULE = {"rules": study_rule(
    study_trigger_condition="received_series",
    study_trigger_series="'Axial T2' and ('Sag T1' or 'Cor T1')",
)}  # fmt: skip


def test_received_series_releases_as_soon_as_the_required_series_are_in(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rt = runtime(tmp_path, plugin_manager, {"mr": SERIES_RULE["rules"]})
    router = Router(rt)
    first = receive(rt, "Axial T2 TSE")
    router.run_once()
    [task] = collecting(rt)
    study = study_of(task)
    assert study.received_series == ["Axial T2 TSE"]
    assert study.complete_trigger == "received_series"
    assert study.complete_required_series == "'Axial T2' and ('Sag T1' or 'Cor T1')"
    assert study.complete_force is False and study.complete_force_action == "discard"
    assert task.info.uid == STUDY and task.info.uid_type == "study"
    assert task.info.applied_rule == "mr" and task.info.action == "route"
    assert jobs_in(rt, "outgoing") == []

    second = receive(rt, "sag t1 gre")  # substrings, compared case-insensitively
    router.run_once()
    [(path, released)] = jobs_in(rt, "outgoing")
    assert collecting(rt) == []
    assert {p.name for p in instance_files(path)} == set(first + second)
    assert path.name == released.id == task.id
    study = study_of(released)
    assert study.received_series == ["Axial T2 TSE", "sag t1 gre"]
    assert len(study.received_series_uid or []) == 2
    assert released.target_names == ["a"]
    assert released.collection is not None and "required series" in (
        released.collection.released or ""
    )
    assert len(recorder.of(TaskEventType.STUDY_COLLECTED)) == 2
    [event] = recorder.of(TaskEventType.STUDY_RELEASED)
    assert event.task_id == task.id and event.extra["state"] == "outgoing"
    assert event.file_count == 4

    # A series of the same study after the release starts a new study job.
    late = receive(rt, "Cor T1")
    router.run_once()
    [again] = collecting(rt)
    assert again.id != task.id
    assert study_of(again).received_series == ["Cor T1"]
    folder = rt.config.folder("studies") / collection_name(STUDY, "mr")
    assert {p.name for p in instance_files(folder)} == set(late)


def test_timeout_waits_for_a_series_of_the_study_still_arriving(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = runtime(tmp_path, plugin_manager, {"s": study_rule()}, study_complete_trigger=60)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    assert router.releaser.run_once(now=time.time() + 30) == 0  # not quiet long enough
    # A second series of the study is still arriving: the study waits for it.
    rt.config.series_complete_trigger = 3600
    receive(rt, "T2")
    assert router.releaser.run_once(now=time.time() + 120) == 0
    assert len(collecting(rt)) == 1
    rt.config.series_complete_trigger = 0
    router.run_once()  # T2 is complete: added, and the quiet time starts again
    [task] = collecting(rt)
    assert study_of(task).received_series == ["T1", "T2"]
    assert router.releaser.run_once(now=time.time() + 30) == 0
    assert router.releaser.run_once(now=time.time() + 61) == 1
    [(_path, released)] = jobs_in(rt, "outgoing")
    assert released.collection is not None
    assert (released.collection.released or "").startswith("timeout")


def test_received_series_with_an_empty_list_completes_by_timeout(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rules = {"s": study_rule(study_trigger_condition="received_series")}
    rt = runtime(tmp_path, plugin_manager, rules, study_complete_trigger=60)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    assert router.releaser.run_once(now=time.time() + 61) == 1


@pytest.mark.parametrize("action", ["discard", "proceed", "ignore"])
def test_force_completion_after_the_force_time(
    tmp_path: Path, plugin_manager: PluginManager, action: str
) -> None:
    rules = {"s": study_rule(
        study_trigger_condition="received_series",
        study_trigger_series="'T1' and 'never sent'",
        study_force_completion_action=action,
    )}  # fmt: skip
    rt = runtime(tmp_path, plugin_manager, rules, study_forcecomplete_trigger=HOUR)
    router = Router(rt)
    names = receive(rt, "T1")
    router.run_once()
    assert router.releaser.run_once(now=time.time() + HOUR - 60) == 0
    released = router.releaser.run_once(now=time.time() + HOUR + 1)
    if action == "ignore":
        assert released == 0 and len(collecting(rt)) == 1
        assert router.releaser.run_once(now=time.time() + 100 * HOUR) == 0
        return
    assert released == 1 and collecting(rt) == []
    state = "discard" if action == "discard" else "outgoing"
    [(path, task)] = jobs_in(rt, state)
    assert {p.name for p in instance_files(path)} == set(names)
    assert study_of(task).complete_force is (action == "proceed")
    if action == "discard":
        assert task.info.action == "discard"


def test_force_complete_marker_and_command(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rules = {"s": study_rule(study_trigger_condition="received_series",
                             study_trigger_series="'never sent'")}  # fmt: skip
    rt = runtime(tmp_path, plugin_manager, rules)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    assert router.run_once() == 0
    assert len(collecting(rt)) == 1
    folder = rt.config.folder("studies") / collection_name(STUDY, "s")
    (folder / FORCE_COMPLETE).touch()  # as mercure's UI does
    assert router.run_once() == 1
    [(path, released)] = jobs_in(rt, "outgoing")
    assert study_of(released).complete_force is True
    assert not (path / FORCE_COMPLETE).exists()
    assert "forced" in (released.collection.released or "") if released.collection else False


def test_force_complete_operation_records_the_operator(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    """The function behind ``mercure study complete`` and the dashboard's button."""
    from mercure.operations import OperationError, force_complete_study, study_store

    rules = {"s": study_rule(study_trigger_condition="received_series",
                             study_trigger_series="'never sent'")}  # fmt: skip
    rt = runtime(tmp_path, plugin_manager, rules)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    [listed] = study_store(rt).open_studies()
    assert (listed.study_uid, listed.rule, listed.series, listed.instances) == (
        STUDY,
        "s",
        ("T1",),
        2,
    )
    assert listed.trigger == "received_series" and not listed.force_requested
    with pytest.raises(OperationError, match="no study 'nope'"):
        force_complete_study(rt, "nope", operator="olga")
    with pytest.raises(OperationError, match="of rule other"):
        force_complete_study(rt, STUDY, rule="other", operator="olga")
    assert router.run_once() == 0  # nothing was forced by the refusals
    [outcome] = force_complete_study(rt, STUDY, rule="s", operator="olga", by="web")
    assert outcome.task_id == listed.task_id and "completion requested" in outcome.message
    assert study_store(rt).open_studies()[0].force_requested
    [forced] = recorder.of(TaskEventType.STUDY_FORCE_REQUESTED)
    assert forced.task_id == listed.task_id and forced.series_uid == STUDY
    assert forced.extra == {"operator": "olga", "by": "web"}
    assert router.run_once() == 1
    [(_, released)] = jobs_in(rt, "outgoing")
    assert released.id == listed.task_id and study_of(released).complete_force is True
    assert study_store(rt).open_studies() == []


def test_notification_study_is_complete_at_once(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rules = {"n": {"rule": "True", "action": "notification", "action_trigger": "study",
                   "notification_webhook": "http://127.0.0.1:9/hook"}}  # fmt: skip
    rt = runtime(tmp_path, plugin_manager, rules, study_complete_trigger=60)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    assert router.releaser.run_once(now=time.time() + 61) == 1
    [(_path, task)] = jobs_in(rt, "success")
    events = [json.loads(p.read_text())["notification"]["event"] for p in
              rt.outbox.due(now=float("inf"))]  # fmt: skip
    assert sorted(events) == ["completion", "reception"]
    assert recorder.of(TaskEventType.COMPLETED)[0].task_id == task.id


def test_both_study_goes_to_processing_with_its_module_and_target(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rules = {"b": study_rule(action="both", processing_module="ai")}
    rt = runtime(tmp_path, plugin_manager, rules, study_complete_trigger=60)
    router = Router(rt)
    receive(rt, "T1")
    receive(rt, "T2")
    router.run_once()
    assert router.releaser.run_once(now=time.time() + 61) == 1
    [(path, task)] = jobs_in(rt, "processing")
    assert len(instance_files(path)) == 4
    assert task.target_names == ["a"]
    assert not isinstance(task.process, dict) and task.info.action == "both"


def test_a_study_rule_next_to_a_series_rule(tmp_path: Path, plugin_manager: PluginManager) -> None:
    rules = {"series": {"rule": "True", "target": "a"}, "study": study_rule()}
    rt = runtime(tmp_path, plugin_manager, rules)
    router = Router(rt)
    receive(rt, "T1")
    router.run_once()
    assert len(jobs_in(rt, "outgoing")) == 1  # the series job, at once
    assert len(collecting(rt)) == 1
    assert rt.spool.series() == []


def test_a_series_without_study_uid_goes_to_error_with_the_reason(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = runtime(tmp_path, plugin_manager, {"s": study_rule()})
    tags = {"SeriesInstanceUID": "1.2.3", "SeriesDescription": "T1"}
    rt.spool.store("1.2.3", "1.2.3.1", [b"DICM"], tags)
    Router(rt).run_once()
    [(path, task)] = jobs_in(rt, "error")
    assert "no StudyInstanceUID" in (task.error or "")
    assert len(instance_files(path)) == 1


def test_a_study_mercure_began_is_released(tmp_path: Path, plugin_manager: PluginManager) -> None:
    """A studies/ folder written by mercure (no collection record) is understood."""
    rt = runtime(tmp_path, plugin_manager, {"s": study_rule()}, study_complete_trigger=60)
    folder = rt.config.folder("studies") / f"{STUDY}#s"
    folder.mkdir(parents=True)
    (folder / "1.2.3#a.dcm").write_bytes(b"DICM")
    old = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 120))
    task = {
        "id": "5d1f3a2e-0000-11ef-9f1e-0242ac120002",
        "info": {"action": "route", "uid": STUDY, "uid_type": "study",
                 "triggered_rules": {"s": True}, "applied_rule": "s", "mrn": "M", "acc": "A",
                 "mercure_version": "0.4.1", "mercure_appliance": "m", "mercure_server": "h"},
        "dispatch": {"target_name": ["a"], "retries": None, "next_retry_at": None},
        "study": {"study_uid": STUDY, "complete_trigger": "timeout",
                  "complete_required_series": "", "creation_time": old,
                  "last_receive_time": old, "received_series": ["T1"],
                  "received_series_uid": ["1.2.3"], "complete_force": False,
                  "complete_force_action": "discard"},
    }  # fmt: skip
    (folder / "task.json").write_text(json.dumps(task))
    assert Router(rt).releaser.run_once() == 1
    [(_path, released)] = jobs_in(rt, "outgoing")
    assert released.id == task["id"]


# -- crashes -----------------------------------------------------------------------------------


class Crash(BaseException):
    """kill -9 at one line: nothing after it runs."""


def test_router_killed_while_adding_a_series_adds_it_once(
    tmp_path: Path, plugin_manager: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(tmp_path, plugin_manager, {"s": study_rule()}, study_complete_trigger=60)
    receive(rt, "T1")
    Router(rt).run_once()
    names = receive(rt, "T2")
    real = study_jobs.write_task

    def crash(*args: Any, **kw: Any) -> None:
        raise Crash("after linking the files, before recording the series")

    monkeypatch.setattr(study_jobs, "write_task", crash)
    with pytest.raises(Crash):
        Router(rt).run_once()
    monkeypatch.setattr(study_jobs, "write_task", real)
    Router(rt).run_once()  # a new router finishes it
    [task] = collecting(rt)
    assert study_of(task).received_series == ["T1", "T2"]
    Router(rt).run_once()
    [task] = collecting(rt)
    assert study_of(task).received_series == ["T1", "T2"]
    folder = rt.config.folder("studies") / collection_name(STUDY, "s")
    assert set(names) <= {p.name for p in instance_files(folder)}
    assert rt.spool.taken() == []


def test_study_released_before_the_killed_router_came_back(
    tmp_path: Path, plugin_manager: PluginManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Added and recorded, killed before the series folder was removed; another router
    released the study meanwhile: the restarted router must not start a second study."""
    rule = study_rule(study_trigger_condition="received_series", study_trigger_series="'T1'")
    rt = runtime(tmp_path, plugin_manager, {"s": rule})
    receive(rt, "T1")
    router = Router(rt)

    real = Router.route_series

    def crash(self: Router, folder: Path) -> None:
        real(self, folder)
        raise Crash("before removing the series folder")

    monkeypatch.setattr(Router, "route_series", crash)
    with pytest.raises(Crash):
        router.run_once()
    monkeypatch.undo()
    assert len(rt.spool.taken()) == 1
    assert Router(rt).releaser.run_once() == 1  # another router
    Router(rt).run_once()
    assert collecting(rt) == []
    all_jobs = [ref for ref in rt.store.list(STATES)]
    assert len(all_jobs) == 1 and all_jobs[0].state == "outgoing"
    assert rt.spool.taken() == []
