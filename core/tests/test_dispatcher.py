"""The dispatcher: per-instance delivery state, retries with backoff, errors, concurrency."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from mercure import hookimpl
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.incoming import instance_files
from mercure.jobs.store import JobRef
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, read_task, write_task
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn
from mercure.services.dispatcher import Dispatcher, retry_delay
from mercure.services.runtime import Runtime, build_runtime
from mercure.targets import (
    DeliveryJob,
    DeliveryResult,
    PermanentTargetError,
    Target,
    TargetConfig,
    TargetError,
)
from mercure.testing import config_for

Behaviour = Callable[[str, DeliveryJob], DeliveryResult]


def deliver_all(name: str, job: DeliveryJob) -> DeliveryResult:
    return DeliveryResult.all_delivered(job)


class Probe:
    """A plugin with target type ``probe`` whose behaviour each test sets."""

    def __init__(self) -> None:
        self.behaviour: Behaviour = deliver_all
        self.finished: list[tuple[str, list[str]]] = []
        self.finish_behaviour: Callable[[str], None] = lambda name: None
        self.calls: list[tuple[str, list[str]]] = []
        self.events: list[TaskEvent] = []
        self.lock = threading.Lock()

    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        probe = self

        class ProbeConfig(TargetConfig):
            target_type: Literal["probe"] = "probe"

        class ProbeTarget(Target[ProbeConfig]):
            def send(self, job: DeliveryJob) -> DeliveryResult:
                with probe.lock:
                    probe.calls.append((self.name, [f.name for f in job.files]))
                return probe.behaviour(self.name, job)

            def finish(self, job: DeliveryJob) -> None:
                with probe.lock:
                    probe.finished.append((self.name, sorted(f.name for f in job.files)))
                probe.finish_behaviour(self.name)

        register("probe", ProbeConfig, ProbeTarget)

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        with self.lock:
            self.events.append(event)

    def sent(self, target: str = "p") -> list[list[str]]:
        return [files for name, files in self.calls if name == target]


@pytest.fixture
def probe(register_plugin: Any) -> Probe:
    p = Probe()
    register_plugin(p, "probe")
    return p


@pytest.fixture
def make_dispatcher(
    tmp_path: Path, plugin_manager: PluginManager, probe: Probe
) -> Iterator[Callable[..., Dispatcher]]:
    made: list[Dispatcher] = []

    def make(**overrides: Any) -> Dispatcher:
        config = config_for(
            tmp_path,
            targets={"p": {"target_type": "probe"}, "q": {"target_type": "probe"}},
            _registry=plugin_manager.registry,
            **overrides,
        )
        d = Dispatcher(build_runtime(config, plugin_manager, fsync=False))
        made.append(d)
        return d

    yield make
    for d in made:
        d.pool.shutdown(wait=True, cancel_futures=True)
        d.runtime.close()


def add_job(
    rt: Runtime, task_id: str = "job-1", targets: str | list[str] = "p", count: int = 5
) -> JobRef:
    src = rt.config.folder("incoming").parent / "src" / task_id
    src.mkdir(parents=True)
    files = []
    for i in range(count):
        f = src / f"1.2.3.{i}.dcm"
        f.write_bytes(b"instance %d" % i)
        files.append(f)
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3", mrn="M", acc="A"),
        id=task_id,
        dispatch=TaskDispatch(target_name=targets, series_uid="1.2.3"),
        tags={"SeriesInstanceUID": "1.2.3"},
    )
    return rt.store.create("outgoing", task, files)


REFUSED = "peer answered 0xA700 (out of resources)"


def names(count: int = 5) -> list[str]:
    return [f"1.2.3.{i}.dcm" for i in range(count)]


def state_of(rt: Runtime, task_id: str = "job-1") -> tuple[str, Task]:
    ref = rt.store.find_exact(task_id)
    assert ref is not None, f"job {task_id} vanished"
    return ref.state, read_task(ref.path)


def make_due(rt: Runtime, task_id: str = "job-1") -> JobRef:
    """What an operator (or the passing of time) does: the next try is due now."""
    ref = rt.store.find_exact(task_id)
    assert ref is not None and ref.state == "outgoing"
    task = read_task(ref.path)
    assert task.dispatch_state is not None
    task.dispatch_state.next_retry_at = 0
    write_task(ref.path, task, fsync=False)
    return ref


def dispatch(task: Task) -> TaskDispatch:
    assert task.dispatch_state is not None
    return task.dispatch_state


# -- delivery state ----------------------------------------------------------------------------


def test_delivered_instances_are_recorded(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "success"
    assert dispatch(task).delivered == {"p": names()}
    assert dispatch(task).failed == {}
    assert [(a.target, a.delivered, a.failed) for a in dispatch(task).attempts] == [("p", 5, 0)]
    assert task.error is None
    assert probe.sent() == [names()]
    types = [e.type for e in probe.events]
    assert types == [TaskEventType.DELIVERED, TaskEventType.COMPLETED]
    assert len(instance_files(d.runtime.store.path("success", "job-1"))) == 5


def test_retry_sends_only_the_failed_instances(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    broken = {"1.2.3.1.dcm", "1.2.3.3.dcm"}

    def partial(name: str, job: DeliveryJob) -> DeliveryResult:
        result = DeliveryResult()
        for f in job.files:
            if f.name in broken:
                result.failed[f.name] = REFUSED
            else:
                result.delivered.append(f.name)
        return result

    probe.behaviour = partial
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "outgoing"
    disp = dispatch(task)
    assert disp.retries == 1
    assert disp.delivered == {"p": sorted(set(names()) - broken)}
    assert disp.failed == {
        "p": dict.fromkeys(sorted(broken), "peer answered 0xA700 (out of resources)")
    }
    assert (disp.next_retry_at or 0) > task.created_at
    assert any(e.type == TaskEventType.RETRY_SCHEDULED for e in probe.events)

    # Not due yet: nothing is sent.
    d.deliver(ref)
    assert len(probe.sent()) == 1

    probe.behaviour = deliver_all
    d.deliver(make_due(d.runtime))
    assert probe.sent() == [names(), sorted(broken)]
    state, task = state_of(d.runtime)
    assert state == "success"
    assert dispatch(task).delivered == {"p": names()}
    assert dispatch(task).failed == {}


def test_unconfirmed_instances_count_as_failed(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    # Confirms two files, says nothing of the rest, and invents one that was not sent.
    probe.behaviour = lambda name, job: DeliveryResult(
        delivered=[job.files[0].name, job.files[1].name, "9.9.9.dcm"]
    )
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "outgoing"
    assert dispatch(task).delivered == {"p": names()[:2]}
    assert sorted(dispatch(task).failed["p"]) == names()[2:]


def test_each_target_keeps_its_own_state(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime, targets=["p", "q"])

    def q_is_down(name: str, job: DeliveryJob) -> DeliveryResult:
        if name == "q":
            raise TargetError("connection refused by 10.0.0.9:104")
        return DeliveryResult.all_delivered(job)

    probe.behaviour = q_is_down
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "outgoing"
    assert dispatch(task).delivered == {"p": names(), "q": []}
    assert "connection refused" in dispatch(task).failed["q"]["1.2.3.0.dcm"]

    probe.behaviour = deliver_all
    d.deliver(make_due(d.runtime))
    assert probe.sent("p") == [names()]  # p is not sent the job again
    assert probe.sent("q") == [names(), names()]
    assert state_of(d.runtime)[0] == "success"


# -- errors ------------------------------------------------------------------------------------


def test_exception_raised_by_a_target_is_recorded(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)

    def crash(name: str, job: DeliveryJob) -> DeliveryResult:
        raise RuntimeError("socket exploded")

    probe.behaviour = crash
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "outgoing"
    assert dispatch(task).retries == 1
    assert set(dispatch(task).failed["p"].values()) == {"socket exploded"}
    assert dispatch(task).attempts[-1].error == "socket exploded"

    def bare(name: str, job: DeliveryJob) -> DeliveryResult:
        raise KeyError

    probe.behaviour = bare
    d.deliver(make_due(d.runtime))
    _, task = state_of(d.runtime)
    assert dispatch(task).attempts[-1].error == "KeyError"


def test_gives_up_after_retry_max_retries(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    """mercure's semantics: the first try plus ``retry_max`` retries, then error/."""
    d = make_dispatcher(retry_max=3)
    add_job(d.runtime)

    def down(name: str, job: DeliveryJob) -> DeliveryResult:
        raise TargetError("PACS 10.0.0.9:104 refused the association")

    probe.behaviour = down
    for attempt in range(1, 4):
        d.deliver(make_due(d.runtime))
        state, task = state_of(d.runtime)
        assert state == "outgoing", attempt
        assert dispatch(task).retries == attempt
    d.deliver(make_due(d.runtime))
    state, task = state_of(d.runtime)
    assert state == "error"
    assert len(probe.sent()) == 4
    assert task.error is not None
    assert "gave up after 4 tries" in task.error
    assert "refused the association" in task.error
    assert any("error:" in h for h in task.history)
    errors = [e for e in probe.events if e.type == TaskEventType.MOVED_TO_ERROR]
    assert len(errors) == 1 and "refused the association" in errors[0].info


@pytest.mark.parametrize("how", ["raised", "reported"])
def test_permanent_failure_goes_to_error_at_once(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe, how: str
) -> None:
    """Wrong credentials will never work: no retry storm, error/ with the peer's reason."""
    d = make_dispatcher(retry_max=5)
    add_job(d.runtime, targets=["q", "p"])

    def denied(name: str, job: DeliveryJob) -> DeliveryResult:
        if name == "q":
            return DeliveryResult.all_delivered(job)
        if how == "raised":
            raise PermanentTargetError("401 Unauthorized: check the target's user and password")
        half = job.files[:2]
        return DeliveryResult(
            delivered=[f.name for f in half],
            error="401 Unauthorized: check the target's user and password",
            permanent=True,
        )

    probe.behaviour = denied
    d.deliver(make_due(d.runtime))
    state, task = state_of(d.runtime)
    assert state == "error"
    assert task.error is not None
    assert "not retried" in task.error and "401 Unauthorized" in task.error
    assert dispatch(task).retries == 0
    assert len(probe.sent("p")) == 1
    assert dispatch(task).delivered["q"] == names()
    expected_p = [] if how == "raised" else names(2)
    assert dispatch(task).delivered.get("p", []) == expected_p


def test_finish_runs_once_per_target_after_every_instance_is_confirmed(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    """A completion step (a marker, a rename, a manifest) that fails is retried on its own."""
    d = make_dispatcher(retry_max=5)
    add_job(d.runtime, targets=["p", "q"])
    failures = {"q": 1}

    def flaky_finish(name: str) -> None:
        if failures.get(name):
            failures[name] -= 1
            raise TargetError("manifest upload refused (503)")

    probe.finish_behaviour = flaky_finish
    d.deliver(make_due(d.runtime))
    state, task = state_of(d.runtime)
    assert state == "outgoing"
    assert dispatch(task).finished == ["p"]
    assert (
        "q: completing the series failed: manifest upload refused"
        in (dispatch(task).attempts[-1].error or "")
        or dispatch(task).retries == 1
    )
    sent_before = len(probe.calls)
    d.deliver(make_due(d.runtime))
    state, task = state_of(d.runtime)
    assert state == "success"
    assert dispatch(task).finished == ["p", "q"]
    assert len(probe.calls) == sent_before  # no instance was sent again
    assert probe.finished == [("p", names()), ("q", names()), ("q", names())]


def test_a_permanent_finish_failure_goes_to_error(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    add_job(d.runtime)

    def denied(name: str) -> None:
        raise PermanentTargetError("403 Forbidden: cannot write the .complete marker")

    probe.finish_behaviour = denied
    d.deliver(make_due(d.runtime))
    state, task = state_of(d.runtime)
    assert state == "error"
    assert task.error is not None and "cannot write the .complete marker" in task.error


def test_unreadable_task_file_moves_the_job_to_error(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    (ref.path / "task.json").write_text('{"info": {"action": "route"')  # cut short
    d.deliver(ref)
    assert d.runtime.store.find_exact("job-1") == JobRef(
        "job-1", "error", d.runtime.store.path("error", "job-1")
    )
    assert probe.sent() == []
    errors = [e for e in probe.events if e.type == TaskEventType.MOVED_TO_ERROR]
    assert len(errors) == 1
    assert "task.json cannot be read" in errors[0].info
    # The instances are kept with the job.
    assert len(instance_files(d.runtime.store.path("error", "job-1"))) == 5


def test_task_file_without_dispatch_section_goes_to_error(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    task = read_task(ref.path)
    task.dispatch = {}
    write_task(ref.path, task, fsync=False)
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "error"
    assert task.error == "task.json has no dispatch section"


def test_target_removed_from_the_configuration(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher(retry_max=0)
    ref = add_job(d.runtime, targets="gone")
    d.deliver(ref)
    state, task = state_of(d.runtime)
    assert state == "error"
    assert task.error is not None
    assert "target 'gone' is not in the configuration" in task.error
    assert probe.calls == []


def test_a_claimed_job_is_left_alone(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher()
    ref = add_job(d.runtime)
    claim = d.runtime.store.claim(ref)
    assert claim is not None
    with claim:
        d.deliver(ref)
        assert probe.sent() == []
        assert state_of(d.runtime)[0] == "outgoing"
    d.deliver(ref)
    assert state_of(d.runtime)[0] == "success"


# -- backoff -----------------------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, pick: Literal["low", "high"]) -> None:
        super().__init__(0)
        self.pick = pick

    def uniform(self, a: float, b: float) -> float:
        return a if self.pick == "low" else b


def test_retry_delay_is_exponential_capped_and_jittered(
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    config = make_dispatcher(retry_delay=900, retry_max=10).runtime.config
    assert config.retry_delay_max == 21600
    rng = random.Random(1234)
    for retries in range(1, 11):
        base = min(900 * 2 ** (retries - 1), 21600)
        for _ in range(200):
            delay = retry_delay(config, retries, rng)
            assert 0.8 * base <= delay <= 1.2 * base, (retries, delay)
        assert retry_delay(config, retries, FixedRandom("low")) == pytest.approx(0.8 * base)
        assert retry_delay(config, retries, FixedRandom("high")) == pytest.approx(1.2 * base)
    # Jitter: two jobs failing together do not retry together.
    delays = {round(retry_delay(config, 1, rng), 6) for _ in range(20)}
    assert len(delays) > 1
    assert retry_delay(config, 0, FixedRandom("high")) == pytest.approx(1.2 * 900)


def test_next_retry_is_scheduled_with_the_backoff(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    d = make_dispatcher(retry_delay=100, retry_max=5)
    add_job(d.runtime)
    probe.behaviour = lambda name, job: DeliveryResult(error="peer down")
    for retries in (1, 2, 3):
        ref = make_due(d.runtime)
        d.deliver(ref)
        _, task = state_of(d.runtime)
        disp = dispatch(task)
        last_try = disp.attempts[-1].at
        wait = (disp.next_retry_at or 0) - last_try
        base = 100 * 2 ** (retries - 1)
        assert 0.8 * base - 1 <= wait <= 1.2 * base + 1, (retries, wait)


# -- concurrency -------------------------------------------------------------------------------


def test_several_jobs_are_in_flight_at_once(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    workers = 3
    d = make_dispatcher(dispatcher_workers=workers)
    barrier = threading.Barrier(workers, timeout=20)

    def together(name: str, job: DeliveryJob) -> DeliveryResult:
        barrier.wait()  # only returns when `workers` sends are running at the same time
        return DeliveryResult.all_delivered(job)

    probe.behaviour = together
    for i in range(workers):
        add_job(d.runtime, f"job-{i}", count=2)
    submitted = d.run_once()
    assert submitted == workers
    for future in list(d.in_flight.values()):
        future.result(timeout=60)
    assert not barrier.broken
    states = {state_of(d.runtime, f"job-{i}")[0] for i in range(workers)}
    assert states == {"success"}


def test_a_retry_scheduled_while_its_delivery_finishes_is_not_lost(
    make_dispatcher: Callable[..., Dispatcher], probe: Probe
) -> None:
    """A failed delivery schedules its retry before its worker is done; a pass in between
    must not drop the retry (the job would wait in outgoing/ for ever)."""
    from concurrent.futures import Future

    d = make_dispatcher()
    add_job(d.runtime, "job-1", count=2)
    finishing: Future[None] = Future()
    d.in_flight["job-1"] = finishing  # its delivery has just rescheduled it, due now
    d._schedule("job-1", 0.0, "normal")
    assert d.run_once() == 0  # still in flight: not sent twice
    finishing.set_result(None)
    assert d.run_once() == 1  # the delivery ended: the retry goes out
    d.in_flight["job-1"].result(timeout=60)
    assert state_of(d.runtime, "job-1")[0] == "success"
