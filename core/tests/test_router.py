"""Routing semantics (mercure's), and a router that is killed half way and restarted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from mercure import hookimpl
from mercure.config import Config
from mercure.events import TaskEventType
from mercure.jobs.incoming import PLAN_FILE, TAGS_FILE, instance_files
from mercure.jobs.store import STATES, JobRef
from mercure.jobs.task import Task, TaskProcessing, read_task
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn
from mercure.services.router import DONE_PREFIX, Router, evaluate_rules, plan_jobs
from mercure.services.runtime import Runtime, build_runtime
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig
from mercure.testing import config_for, make_series
from task_recorder import Recorder

SERIES = "1.2.826.0.1.3680043.8.498.1"
CT_TAGS = {
    "SeriesInstanceUID": SERIES,
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.2",
    "Modality": "CT",
    "SeriesDescription": "THORAX 1.0 B31f",
    "SliceThickness": "1.0",
    "PatientName": "Doe^Jane",
    "PatientID": "MRN42",
    "AccessionNumber": "ACC42",
}


def make_config(
    tmp_path: Path,
    plugin_manager: PluginManager,
    rules: dict[str, Any],
    modules: dict[str, Any] | None = None,
    **overrides: Any,
) -> Config:
    targets = {
        "a": {"target_type": "folder", "folder": str(tmp_path / "target-a")},
        "b": {"target_type": "folder", "folder": str(tmp_path / "target-b")},
        "d": {"target_type": "dummy"},
    }
    overrides.setdefault("series_complete_trigger", 0)
    if "recording" in plugin_manager.registry.names("notifier"):
        overrides.setdefault("plugins", {"notifiers": {"recording": {}}})
    return config_for(
        tmp_path,
        targets=targets,
        rules=rules,
        modules=modules if modules is not None else {"ai": {"docker_tag": "x/ai:1"}},
        _registry=plugin_manager.registry,
        **overrides,
    )


def make_runtime(
    tmp_path: Path, plugin_manager: PluginManager, rules: dict[str, Any], **kw: Any
) -> Runtime:
    return build_runtime(make_config(tmp_path, plugin_manager, rules, **kw), plugin_manager)


def receive(rt: Runtime, tags: dict[str, str], count: int = 3) -> list[str]:
    """Store ``count`` instances of the series in ``tags`` as a receiver does."""
    names = []
    for i in range(count):
        sop = f"{tags['SeriesInstanceUID']}.{i + 1}"
        rt.spool.store(tags["SeriesInstanceUID"], sop, [b"DICM instance %d" % i], tags)
        names.append(f"{sop}.dcm")
    return names


def jobs(rt: Runtime) -> dict[str, list[tuple[JobRef, Task]]]:
    found: dict[str, list[tuple[JobRef, Task]]] = {s: [] for s in STATES}
    for ref in rt.store.list():
        found[ref.state].append((ref, read_task(ref.path)))
    return found


def spool_is_empty(rt: Runtime) -> bool:
    return rt.spool.series() == [] and os.listdir(rt.spool.routing) == []


# -- evaluate_rules ----------------------------------------------------------------------------


def test_fallback_only_when_no_other_rule_matches(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "ct": {"rule": "tags.Modality == 'CT'", "target": "a"},
            "fb": {"rule": "True", "target": "b", "fallback": True},
        },
    )
    d = evaluate_rules(config, CT_TAGS)
    assert d.triggered == ["ct"]
    assert not d.fallback_used
    d = evaluate_rules(config, {**CT_TAGS, "Modality": "MR"})
    assert d.triggered == ["fb"]
    assert d.fallback_used


def test_a_matching_discard_rule_prevents_the_fallback(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "drop": {"rule": "tags.Modality == 'SR'", "action": "discard"},
            "fb": {"rule": "True", "target": "b", "fallback": True},
        },
    )
    d = evaluate_rules(config, {**CT_TAGS, "Modality": "SR"})
    assert d.triggered == ["drop"]
    assert d.discard_rule == "drop"
    assert not d.fallback_used


def test_disabled_rules_are_ignored(tmp_path: Path, plugin_manager: PluginManager) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "off": {"rule": "True", "target": "a", "disabled": True},
            "off_drop": {"rule": "True", "action": "discard", "disabled": True},
            "off_fb": {"rule": "True", "target": "b", "fallback": True, "disabled": True},
        },
    )
    d = evaluate_rules(config, CT_TAGS)
    assert d.triggered == []
    assert d.discard_rule is None
    assert not d.fallback_used
    assert "off" not in d.results


def test_missing_tags_make_a_rule_false(tmp_path: Path, plugin_manager: PluginManager) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "ne": {"rule": "tags.BodyPartExamined != 'HEAD'", "target": "a"},
            "notin": {"rule": "'X' not in tags.ImageComments", "target": "a"},
            "thin": {"rule": "float(tags.SliceThickness) < 2.0", "target": "b"},
        },
    )
    d = evaluate_rules(config, {"SeriesInstanceUID": SERIES})
    assert d.triggered == []
    assert "BodyPartExamined" in d.results["ne"].missing_tags
    assert "ImageComments" in d.results["notin"].missing_tags
    assert "SliceThickness" in d.results["thin"].missing_tags
    present = {**CT_TAGS, "BodyPartExamined": "CHEST", "ImageComments": ""}
    assert evaluate_rules(config, present).triggered == ["ne", "notin", "thin"]


# -- plan_jobs ---------------------------------------------------------------------------------


def plan(config: Config, tags: dict[str, str] = CT_TAGS) -> list[Any]:
    return plan_jobs(config, tags, evaluate_rules(config, tags))


def test_one_job_per_distinct_target(tmp_path: Path, plugin_manager: PluginManager) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "r1": {"rule": "True", "target": ["a", "b", "a"]},
            "r2": {"rule": "tags.Modality == 'CT'", "target": "a"},
        },
    )
    planned = plan(config)
    assert sorted(j.task["dispatch"]["target_name"] for j in planned) == ["a", "b"]
    assert all(j.state == "outgoing" for j in planned)
    assert len({j.id for j in planned}) == 2
    job_a = next(j for j in planned if j.task["dispatch"]["target_name"] == "a")
    assert job_a.rules == ["r1", "r2"]
    assert job_a.task["info"]["triggered_rules"] == {"r1": True, "r2": True}
    assert job_a.task["info"]["action"] == "route"
    assert job_a.task["info"]["uid"] == SERIES
    assert job_a.task["info"]["mrn"] == "MRN42"
    assert job_a.task["dispatch"]["series_uid"] == SERIES


def test_process_and_both_make_one_processing_job_per_rule(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "p": {"rule": "True", "action": "process", "processing_module": "ai"},
            "b": {
                "rule": "True",
                "action": "both",
                "target": ["a", "d"],
                "processing_module": ["ai", "anon"],
                "processing_settings": [{"t": 1}, {"k": 2}],
                "processing_retain_images": True,
            },
        },
        modules={"ai": {"docker_tag": "x/ai:1"}, "anon": {"docker_tag": "x/anon:2"}},
    )
    planned = {j.rules[0]: j for j in plan(config)}
    assert set(planned) == {"p", "b"}
    p, b = planned["p"], planned["b"]
    assert p.state == b.state == "processing"
    assert p.task["info"]["action"] == "process"
    assert p.task["dispatch"] == {}
    assert TaskProcessing.model_validate(p.task["process"]).module_name == "ai"
    assert p.task["process"]["module_config"]["docker_tag"] == "x/ai:1"
    assert b.task["info"]["action"] == "both"
    assert b.task["dispatch"]["target_name"] == ["a", "d"]
    assert [m["module_name"] for m in b.task["process"]] == ["ai", "anon"]
    assert [m["settings"] for m in b.task["process"]] == [{"t": 1}, {"k": 2}]
    assert all(m["retain_input_images"] for m in b.task["process"])


def test_discard_wins(tmp_path: Path, plugin_manager: PluginManager) -> None:
    config = make_config(
        tmp_path,
        plugin_manager,
        {
            "route": {"rule": "True", "target": "a"},
            "proc": {"rule": "True", "action": "process", "processing_module": "ai"},
            "drop": {"rule": "tags.Modality == 'CT'", "action": "discard"},
        },
    )
    planned = plan(config)
    assert len(planned) == 1
    assert planned[0].state == "discard"
    assert planned[0].task["info"]["action"] == "discard"
    assert planned[0].task["info"]["triggered_rules"] == {"drop": True}
    assert planned[0].event == TaskEventType.DISCARDED


def test_no_matching_rule_plans_a_discard(tmp_path: Path, plugin_manager: PluginManager) -> None:
    config = make_config(
        tmp_path, plugin_manager, {"mr": {"rule": "tags.Modality == 'MR'", "target": "a"}}
    )
    planned = plan(config)
    assert [(j.state, j.task["info"]["action"]) for j in planned] == [("discard", "discard")]
    assert planned[0].rules == []


def test_notification_only_keeps_the_series_in_discard(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    config = make_config(
        tmp_path, plugin_manager, {"n": {"rule": "True", "action": "notification"}}
    )
    planned = plan(config)
    assert [(j.state, j.task["info"]["action"], j.rules) for j in planned] == [
        ("discard", "notification", ["n"])
    ]


# -- the router on a real spool ----------------------------------------------------------------


def test_every_action_end_to_end(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "route_ab": {"rule": "tags.Modality == 'CT'", "target": ["a", "b"]},
            "route_b": {"rule": "'THORAX' in tags.SeriesDescription", "target": "b"},
            "proc": {"rule": "True", "action": "process", "processing_module": "ai"},
            "both": {"rule": "True", "action": "both", "target": "d", "processing_module": "ai"},
            "off": {"rule": "True", "target": "a", "disabled": True},
        },
    )
    names = receive(rt, CT_TAGS, 4)
    assert Router(rt).run_once() == 1
    found = jobs(rt)
    assert spool_is_empty(rt)
    outgoing = {t.target_names[0]: (r, t) for r, t in found["outgoing"]}
    assert set(outgoing) == {"a", "b"}
    assert outgoing["b"][1].info.triggered_rules == {"route_ab": True, "route_b": True}
    assert sorted(t.info.action for _, t in found["processing"]) == ["both", "process"]
    assert found["discard"] == [] and found["success"] == [] and found["error"] == []
    for ref, task in found["outgoing"] + found["processing"]:
        assert [p.name for p in instance_files(ref.path)] == sorted(names)
        assert task.tags == CT_TAGS
    # One event per job, after the job exists.
    routed = [e for e in recorder.events if e.type == TaskEventType.ROUTED]
    assert sorted(e.target for e in routed) == ["a", "b"]
    assert all(e.file_count == 4 for e in routed)
    assert len([e for e in recorder.events if e.type == TaskEventType.QUEUED_FOR_PROCESSING]) == 2
    assert sorted(recorder.notified(rt, "reception")) == ["both", "proc", "route_ab", "route_b"]


def test_unmatched_series_goes_to_discard_with_its_files(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rt = make_runtime(
        tmp_path, plugin_manager, {"mr": {"rule": "tags.Modality == 'MR'", "target": "a"}}
    )
    names = receive(rt, CT_TAGS, 5)
    Router(rt).run_once()
    found = jobs(rt)
    assert [len(v) for v in found.values()] == [0, 0, 0, 0, 1]
    ref, task = found["discard"][0]
    assert [p.name for p in instance_files(ref.path)] == sorted(names)
    assert task.info.action == "discard"
    assert task.info.uid == SERIES
    assert spool_is_empty(rt)
    assert [e.type for e in recorder.events] == [TaskEventType.DISCARDED]


def test_discard_rule_wins_on_a_real_spool(tmp_path: Path, plugin_manager: PluginManager) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "all": {"rule": "True", "target": "a"},
            "drop": {"rule": "tags.Modality == 'CT'", "action": "discard"},
        },
    )
    receive(rt, CT_TAGS)
    receive(rt, {**CT_TAGS, "SeriesInstanceUID": "1.2.3", "Modality": "MR"})
    Router(rt).run_once()
    found = jobs(rt)
    assert [t.info.uid for _, t in found["discard"]] == [SERIES]
    assert [t.info.uid for _, t in found["outgoing"]] == ["1.2.3"]


def test_fallback_on_a_real_spool(tmp_path: Path, plugin_manager: PluginManager) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "mr": {"rule": "tags.Modality == 'MR'", "target": "a"},
            "fb": {"rule": "False", "target": "b", "fallback": True},
        },
    )
    receive(rt, CT_TAGS)
    Router(rt).run_once()
    found = jobs(rt)
    assert [(t.target_names, t.info.triggered_rules) for _, t in found["outgoing"]] == [
        (["b"], {"fb": True})
    ]


def test_notification_rule_fires_next_to_a_routing_rule(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    """mercure sends a notification rule's reception notice whatever else matched."""
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "route": {"rule": "True", "target": "a"},
            "tell": {"rule": "tags.Modality == 'CT'", "action": "notification"},
        },
    )
    receive(rt, CT_TAGS)
    Router(rt).run_once()
    found = jobs(rt)
    assert len(found["outgoing"]) == 1
    assert found["discard"] == []
    assert sorted(recorder.notified(rt, "reception")) == ["route", "tell"]


def test_notification_only_series_is_kept_in_discard(
    tmp_path: Path, plugin_manager: PluginManager, recorder: Recorder
) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "tell": {
                "rule": "True",
                "action": "notification",
                "notification_trigger_reception": False,
            }
        },
    )
    names = receive(rt, CT_TAGS)
    Router(rt).run_once()
    found = jobs(rt)
    ((ref, task),) = found["discard"]
    assert task.info.action == "notification"
    assert [p.name for p in instance_files(ref.path)] == sorted(names)
    # A notification rule always notifies on reception.
    assert recorder.notified(rt, "reception") == ["tell"]


LUNG_RULE = "tags.Modality == 'CT' and tags.SeriesDescription == 'LUNG'"


def test_tags_are_read_from_the_first_file_without_series_tags(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {
            "ct": {
                "rule": "tags.Modality == 'CT' and tags.SeriesDescription == 'LUNG'",
                "target": "a",
            }
        },
    )
    files = make_series(tmp_path / "src", 2, series_description="LUNG")
    folder = rt.spool.folder / "series-x"
    folder.mkdir()
    for f in files:
        os.link(f, folder / f.name)
    Router(rt).run_once()
    found = jobs(rt)
    assert len(found["outgoing"]) == 1
    assert found["outgoing"][0][1].tags["SeriesDescription"] == "LUNG"


def test_an_arriving_series_waits_for_the_quiet_time(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = make_runtime(
        tmp_path,
        plugin_manager,
        {"all": {"rule": "True", "target": "a"}},
        series_complete_trigger=60,
    )
    receive(rt, CT_TAGS)
    router = Router(rt)
    router.run_once()
    assert rt.store.list() == []  # the folder target does not stream
    assert len(rt.spool.series()) == 1
    old = os.stat(rt.spool.folder / SERIES).st_mtime - 120
    os.utime(rt.spool.folder / SERIES, (old, old))
    assert router.run_once() == 1
    assert len(jobs(rt)["outgoing"]) == 1
    assert spool_is_empty(rt)


# -- crash and restart -------------------------------------------------------------------------


def take_and_plan(rt: Runtime) -> tuple[Path, list[Any]]:
    """A router's first steps: take the series and store its plan; then it 'dies'."""
    series = rt.spool.folder / SERIES
    taken = rt.spool.take(series)
    assert taken is not None
    planned = Router(rt)._plan(taken, instance_files(taken))
    assert planned is not None
    return taken, planned


ROUTE_TWO = {
    "r": {"rule": "True", "target": ["a", "b"]},
    "p": {"rule": "True", "action": "process", "processing_module": "ai"},
}


def test_router_killed_after_the_plan_and_one_job(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = make_runtime(tmp_path, plugin_manager, ROUTE_TWO)
    receive(rt, CT_TAGS, 3)
    taken, planned = take_and_plan(rt)
    assert (taken / PLAN_FILE).exists()
    assert len(planned) == 3
    first = planned[0]
    rt.store.create(first.state, Task.model_validate(first.task), instance_files(taken))

    # A fresh router (a new process) finishes the same plan.
    rt2 = make_runtime(tmp_path, plugin_manager, ROUTE_TWO)
    assert Router(rt2).run_once() == 1
    refs = rt2.store.list()
    assert sorted(r.id for r in refs) == sorted(j.id for j in planned)
    for ref in refs:
        assert len(instance_files(ref.path)) == 3
    assert spool_is_empty(rt2)
    # And another pass creates nothing more.
    assert Router(rt2).run_once() == 0
    assert len(rt2.store.list()) == 3


def test_router_killed_before_removing_the_series(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = make_runtime(tmp_path, plugin_manager, ROUTE_TWO)
    receive(rt, CT_TAGS, 2)
    taken, planned = take_and_plan(rt)
    for job in planned:
        rt.store.create(job.state, Task.model_validate(job.task), instance_files(taken))
    # A job already went on (delivered) before the restart: it must not come back.
    delivered = rt.store.find_exact(planned[0].id)
    assert delivered is not None
    rt.store.move(delivered, "success")

    Router(rt).run_once()
    states = sorted((r.id, r.state) for r in rt.store.list())
    assert len(states) == 3
    assert (planned[0].id, "success") in states
    assert spool_is_empty(rt)


def test_plan_survives_a_config_change_before_the_restart(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    """The stored plan is what happens: the series is not routed twice by two configs."""
    rt = make_runtime(tmp_path, plugin_manager, {"r": {"rule": "True", "target": "a"}})
    receive(rt, CT_TAGS, 2)
    _, planned = take_and_plan(rt)
    rt2 = make_runtime(tmp_path, plugin_manager, {"r": {"rule": "True", "target": "b"}})
    Router(rt2).run_once()
    ((ref, task),) = jobs(rt2)["outgoing"]
    assert ref.id == planned[0].id
    assert task.target_names == ["a"]


def test_done_leftover_is_removed(tmp_path: Path, plugin_manager: PluginManager) -> None:
    rt = make_runtime(tmp_path, plugin_manager, {"r": {"rule": "True", "target": "a"}})
    leftover = rt.spool.routing / f"{DONE_PREFIX}{SERIES}-abc"
    leftover.mkdir()
    (leftover / "1.dcm").write_bytes(b"x")
    (leftover / TAGS_FILE).write_text(json.dumps(CT_TAGS))
    assert Router(rt).run_once() == 0
    assert not leftover.exists()
    assert rt.store.list() == []  # a finished series is never routed again


def test_empty_taken_folder_is_removed_without_jobs(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = make_runtime(tmp_path, plugin_manager, {"r": {"rule": "True", "target": "a"}})
    empty = rt.spool.routing / f"{SERIES}-0123"
    empty.mkdir()
    (empty / TAGS_FILE).write_text(json.dumps(CT_TAGS))
    Router(rt).run_once()
    assert not empty.exists()
    assert rt.store.list() == []


# -- early dispatch ----------------------------------------------------------------------------


class StreamingPlugin:
    """A target type ``stream`` that declares it can send while a series arrives."""

    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        class StreamConfig(TargetConfig):
            target_type: Literal["stream"] = "stream"

        class StreamTarget(Target[StreamConfig]):
            streaming = True

            def send(self, job: DeliveryJob) -> DeliveryResult:
                return DeliveryResult.all_delivered(job)

        register("stream", StreamConfig, StreamTarget)


def test_open_streaming_job_is_completed_by_a_restarted_router(
    tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any
) -> None:
    register_plugin(StreamingPlugin(), "streaming")
    config = config_for(
        tmp_path,
        targets={
            "s": {"target_type": "stream"},
            "a": {"target_type": "folder", "folder": str(tmp_path / "target-a")},
        },
        rules={"all": {"rule": "True", "target": ["s", "a"]}},
        series_complete_trigger=60,
        early_dispatch=True,
        _registry=plugin_manager.registry,
    )
    rt = build_runtime(config, plugin_manager)
    first = receive(rt, CT_TAGS, 2)
    Router(rt).run_once()
    # The streaming target's job is open with what arrived; the folder target waits.
    ((ref, task),) = jobs(rt)["outgoing"]
    assert task.target_names == ["s"]
    assert rt.store.is_open(ref)
    assert sorted(p.name for p in instance_files(ref.path)) == sorted(first)

    # The router dies; more instances arrive; a new router links them into the same job.
    more = [rt.spool.store(SERIES, f"{SERIES}.{i}", [b"late %d" % i], CT_TAGS).name for i in (3, 4)]
    router = Router(rt)
    router.run_once()
    ((ref2, _),) = jobs(rt)["outgoing"]
    assert ref2 == ref
    assert sorted(p.name for p in instance_files(ref.path)) == sorted(first + more)

    # The series completes: the open job is closed, the folder target's job is created.
    old = os.stat(rt.spool.folder / SERIES).st_mtime - 120
    os.utime(rt.spool.folder / SERIES, (old, old))
    router.run_once()
    found = jobs(rt)["outgoing"]
    assert sorted(t.target_names[0] for _, t in found) == ["a", "s"]
    for job_ref, _ in found:
        assert not rt.store.is_open(job_ref)
        assert sorted(p.name for p in instance_files(job_ref.path)) == sorted(first + more)
    assert spool_is_empty(rt)
