"""Priorities: urgent first without starving normal (mercure's 2:1), offpeak in its window.

Time is injected (the services' ``clock``), never slept; the DST cases use Europe/Berlin,
whose clocks went forward on 2026-03-29 and back on 2026-10-25.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from mercure import hookimpl
from mercure.config import ConfigError
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, TaskProcessing
from mercure.plugins import PluginManager
from mercure.priorities import OffpeakWindow, PriorityPicker, in_window, parse_clock
from mercure.services.dispatcher import Dispatcher
from mercure.services.processor import Processor
from mercure.services.runtime import Runtime, build_runtime
from mercure.testing import config_for

BERLIN = ZoneInfo("Europe/Berlin")
RULES = {
    "u": {"rule": "False", "target": "a", "priority": "urgent"},
    "n": {"rule": "False", "target": "a", "priority": "normal"},
    "o": {"rule": "False", "target": "a", "priority": "offpeak"},
}


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


class Completed:
    def __init__(self) -> None:
        self.order: list[str] = []

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        if event.type == TaskEventType.COMPLETED:
            self.order.append(event.task_id)


def runtime(tmp_path: Path, plugin_manager: PluginManager, **overrides: Any) -> Runtime:
    (tmp_path / "target").mkdir(exist_ok=True)
    overrides.setdefault("local_time", "Europe/Berlin")
    config = config_for(
        tmp_path,
        targets={"a": {"target_type": "folder", "folder": str(tmp_path / "target")}},
        rules=RULES,
        modules={"m": {"command": "{python} -c pass"}},
        dispatcher_workers=1,
        _registry=plugin_manager.registry,
        **overrides,
    )
    return build_runtime(config, plugin_manager, fsync=False)


def job(rt: Runtime, name: str, rule: str, state: str = "outgoing", age: float = 0) -> JobRef:
    src = rt.config.folder("incoming").parent / "src" / name
    src.mkdir(parents=True, exist_ok=True)
    (src / f"{name}.dcm").write_bytes(b"DICM")
    process: Any = {}
    if state == "processing":
        process = TaskProcessing(module_name="m")
    task = Task(
        info=TaskInfo(action="route", uid=name, triggered_rules={rule: True}, applied_rule=rule),
        id=name,
        dispatch=TaskDispatch(target_name="a"),
        process=process,
    )
    ref = rt.store.create(state, task, [src / f"{name}.dcm"])  # type: ignore[arg-type]
    then = time.time() - 1000 + age  # arrival order: by age
    os.utime(ref.path, (then, then))
    return ref


def test_the_picker_takes_urgent_twice_then_normal() -> None:
    picker = PriorityPicker()
    urgent, normal = [f"u{i}" for i in range(6)], [f"n{i}" for i in range(3)]
    order = []
    while (item := picker.pick(urgent, normal)) is not None:
        order.append(item)
    assert order == ["u0", "u1", "n0", "u2", "u3", "n1", "u4", "u5", "n2"]
    # With one kind only, that kind is taken every time.
    assert [picker.pick([], ["x", "y"]), picker.pick([], ["y"])] == ["x", "y"]


def test_dispatch_order_urgent_first_normal_not_starved(
    tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any
) -> None:
    completed = Completed()
    register_plugin(completed, "completed")
    rt = runtime(tmp_path, plugin_manager)
    for i in range(3):
        job(rt, f"normal-{i}", "n", age=i)
    for i in range(6):
        job(rt, f"urgent-{i}", "u", age=10 + i)  # newer than every normal job
    dispatcher = Dispatcher(rt)
    dispatcher.clock = lambda: utc(2026, 6, 1, 10, 0)  # 12:00 in Berlin: not off-peak
    job(rt, "offpeak-0", "o", age=-5)
    while dispatcher.run_once():
        for future in list(dispatcher.in_flight.values()):
            future.result()
    dispatcher.close()
    assert completed.order == [
        "urgent-0", "urgent-1", "normal-0", "urgent-2", "urgent-3", "normal-1",
        "urgent-4", "urgent-5", "normal-2",
    ]  # fmt: skip
    assert [r.id for r in rt.store.list(["outgoing"])] == ["offpeak-0"]  # waits for 22:00


def test_an_offpeak_job_goes_inside_the_window(
    tmp_path: Path, plugin_manager: PluginManager, register_plugin: Any
) -> None:
    completed = Completed()
    register_plugin(completed, "completed")
    rt = runtime(tmp_path, plugin_manager)
    job(rt, "offpeak-0", "o")
    dispatcher = Dispatcher(rt)
    dispatcher.clock = lambda: utc(2026, 6, 1, 19, 59)  # 21:59 CEST
    assert dispatcher.run_once() == 0
    dispatcher.clock = lambda: utc(2026, 6, 1, 20, 0)  # 22:00 CEST
    assert dispatcher.run_once() == 1
    dispatcher.close()
    assert completed.order == ["offpeak-0"]


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        # The night the clocks went forward (CET -> CEST at 01:00 UTC on 2026-03-29).
        (utc(2026, 3, 28, 20, 30), False),  # 21:30 CET
        (utc(2026, 3, 28, 21, 0), True),  # 22:00 CET
        (utc(2026, 3, 29, 3, 59), True),  # 05:59 CEST (a UTC+1 guess would say 04:59)
        (utc(2026, 3, 29, 4, 30), False),  # 06:30 CEST (a UTC+1 guess would say 05:30)
        (utc(2026, 3, 29, 20, 30), True),  # 22:30 CEST (a UTC+1 guess would say 21:30)
        # The night they went back (CEST -> CET at 01:00 UTC on 2026-10-25).
        (utc(2026, 10, 24, 19, 30), False),  # 21:30 CEST
        (utc(2026, 10, 24, 20, 0), True),  # 22:00 CEST
        (utc(2026, 10, 25, 4, 30), True),  # 05:30 CET (a UTC+2 guess would say 06:30)
        (utc(2026, 10, 25, 5, 30), False),  # 06:30 CET
    ],
)
def test_the_window_is_kept_in_the_configured_zone_across_dst(
    moment: float, inside: bool, tmp_path: Path, plugin_manager: PluginManager
) -> None:
    window = OffpeakWindow.from_config(runtime(tmp_path, plugin_manager).config)
    assert window.tz == BERLIN
    assert window.contains(moment) is inside


def test_a_window_that_does_not_pass_midnight() -> None:
    start, end = parse_clock("12:00"), parse_clock("13:30")
    assert in_window(start, end, parse_clock("12:00"))
    assert in_window(start, end, parse_clock("13:30"))
    assert not in_window(start, end, parse_clock("13:31"))
    assert not in_window(start, end, parse_clock("11:59"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("offpeak_start", "10pm", "not a time of day as HH:MM"),
        ("offpeak_end", "25:00", "not a time of day as HH:MM"),
        ("local_time", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_unreadable_window_or_zone_is_refused_at_load(
    tmp_path: Path, plugin_manager: PluginManager, field: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        runtime(tmp_path, plugin_manager, **{field: value})
    [(_path, text)] = [e for e in caught.value.errors if e[0] == field]
    assert message in text


def test_processor_order_urgent_first_and_offpeak_held(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    rt = runtime(tmp_path, plugin_manager)
    for i in range(2):
        job(rt, f"normal-{i}", "n", "processing", age=i)
    for i in range(4):
        job(rt, f"urgent-{i}", "u", "processing", age=10 + i)
    job(rt, "offpeak-0", "o", "processing", age=-5)
    processor = Processor(rt)
    processor.clock = lambda: utc(2026, 6, 1, 10, 0)
    refs = sorted(rt.store.list(["processing"]), key=lambda r: r.path.stat().st_mtime)
    order = [r.id for r in processor._by_priority(refs)]
    assert order == ["urgent-0", "urgent-1", "normal-0", "urgent-2", "urgent-3", "normal-1"]
    processor.clock = lambda: utc(2026, 6, 1, 21, 0)  # 23:00 CEST
    order = [r.id for r in processor._by_priority(refs)]
    assert "offpeak-0" in order
    processor.close()


def test_priority_follows_the_running_configuration(
    tmp_path: Path, plugin_manager: PluginManager
) -> None:
    from mercure.priorities import rule_priority

    rt = runtime(tmp_path, plugin_manager)
    assert rule_priority(rt.config, "u", {"u": True}) == "urgent"
    assert rule_priority(rt.config, "gone", {"n": True, "u": True}) == "urgent"
    assert rule_priority(rt.config, None, {"o": True}) == "offpeak"
    assert rule_priority(rt.config, None, "") == "normal"
