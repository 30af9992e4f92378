"""The plugin contract of every kind: own settings only, lifecycle, notifications and metrics
that never hold up the pipeline, and nothing lost silently.

The plugins here are site-style plugins registered in the test; the series go through the real
DICOM receiver (DCMTK's storescu), the router and the dispatcher running in this process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from mercure import hookimpl
from mercure.config import ConfigError, validate_config
from mercure.events import TaskEvent, TaskEventType
from mercure.metrics import Metric, MetricsSink
from mercure.notifiers import Notification, NotificationError, Notifier
from mercure.plugin_settings import PluginSettings
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn
from mercure.runners import ProcessingRun, Runner, RunOutcome
from mercure.secrets import Secret
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig
from mercure.testing import (
    RunningRouter,
    config_for,
    dcmtk_storescu,
    make_series,
    start_router,
    wait_for,
)

# -- a site plugin of every kind -----------------------------------------------------------------


class ProbeTargetConfig(TargetConfig):
    target_type: Literal["probe"] = "probe"
    label: str


class ProbeTarget(Target[ProbeTargetConfig]):
    seen: list[Any] = []

    def send(self, job: DeliveryJob) -> DeliveryResult:
        ProbeTarget.seen.append(self.config)
        return DeliveryResult.all_delivered(job)


class ProbeRunnerSettings(PluginSettings):
    workers: int = 1
    token: Secret = ""


class ProbeRunner(Runner[ProbeRunnerSettings]):
    @classmethod
    def check_module(
        cls, settings: ProbeRunnerSettings | None, name: str, module: Any
    ) -> list[tuple[str, str]]:
        if module.docker_arguments and settings is not None and settings.workers < 2:
            return [("docker_arguments", f"not allowed with {settings.workers} worker")]
        return []

    def launch(self, run: ProcessingRun) -> str:
        return "h"

    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        return RunOutcome(exit_code=0)

    def cancel(self, handle: str) -> None:
        pass


class SlowNotifierSettings(PluginSettings):
    mode: Literal["hang", "raise", "ok"] = "ok"
    hang_seconds: float = 30.0


class SlowNotifier(Notifier[SlowNotifierSettings]):
    """Hangs (as a dead SMTP server would) or raises, as its settings say."""

    sent: list[Notification] = []
    inside = threading.Event()
    release = threading.Event()

    def send(self, notification: Notification) -> str:
        if self.settings.mode == "hang":
            SlowNotifier.inside.set()
            SlowNotifier.release.wait(self.settings.hang_seconds)
            raise NotificationError("timed out after hanging")
        if self.settings.mode == "raise":
            raise NotificationError("mail server refused the connection")
        SlowNotifier.sent.append(notification)
        return "ok"


class SinkSettings(PluginSettings):
    mode: Literal["record", "raise", "block"] = "record"


class ProbeSink(MetricsSink[SinkSettings]):
    recorded: list[Metric] = []
    started: list[str] = []
    closed: list[str] = []

    def start(self) -> None:
        ProbeSink.started.append(self.name)

    def send(self, metrics: list[Metric]) -> None:
        if self.settings.mode == "raise":
            raise ConnectionError("carbon is down")
        if self.settings.mode == "block":
            time.sleep(3600)
        ProbeSink.recorded.extend(metrics)

    def close(self) -> None:
        ProbeSink.closed.append(self.name)


class Observer:
    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        self.events.append(event)

    def of(self, kind: TaskEventType) -> list[TaskEvent]:
        return [e for e in list(self.events) if e.type == kind]


class SitePlugin:
    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        register("probe", ProbeTargetConfig, ProbeTarget)

    @hookimpl
    def register_runners(self, register: RegisterFn) -> None:
        register("probe", ProbeRunnerSettings, ProbeRunner)

    @hookimpl
    def register_notifiers(self, register: RegisterFn) -> None:
        register("slow", SlowNotifierSettings, SlowNotifier)

    @hookimpl
    def register_metrics_sinks(self, register: RegisterFn) -> None:
        register("probe", SinkSettings, ProbeSink)


@pytest.fixture
def site(plugin_manager: PluginManager, register_plugin: Any) -> Iterator[Observer]:
    register_plugin(SitePlugin(), "site_probe")
    observer = Observer()
    register_plugin(observer, "site_observer")
    ProbeTarget.seen = []
    SlowNotifier.sent = []
    SlowNotifier.inside = threading.Event()
    SlowNotifier.release = threading.Event()
    ProbeSink.recorded, ProbeSink.started, ProbeSink.closed = [], [], []
    yield observer
    SlowNotifier.release.set()


def plugins_config(**plugins: Any) -> dict[str, Any]:
    return {"plugins": plugins}


# -- settings ------------------------------------------------------------------------------------


def test_each_instance_gets_only_its_own_validated_settings(
    tmp_path: Path, plugin_manager: PluginManager, site: Observer, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PROBE_TOKEN", "s3cret")
    config = config_for(
        tmp_path,
        _registry=plugin_manager.registry,
        targets={"t": {"target_type": "probe", "label": "pacs"}},
        rules={"all": {"rule": "True", "target": "t", "notification_webhook": "http://h/x"}},
        process_runner="probe",
        **plugins_config(
            runners={"probe": {"workers": 3, "token": "${env:PROBE_TOKEN}"}},
            notifiers={"slow": {"mode": "raise"}},
            metrics_sinks={"probe": {}, "second": {"type": "probe", "mode": "raise"}},
        ),
    )
    (runner,) = config.plugin_instances("runner")
    assert (runner.name, runner.type_name) == ("probe", "probe")
    assert runner.settings == ProbeRunnerSettings(workers=3, token="s3cret")
    (notifier,) = config.plugin_instances("notifier")
    assert notifier.settings == SlowNotifierSettings(mode="raise")
    sinks = {s.name: s for s in config.plugin_instances("metrics_sink")}
    assert set(sinks) == {"probe", "second"}
    assert sinks["second"].type_name == "probe"
    assert sinks["second"].settings == SinkSettings(mode="raise")

    # What a running process creates: instances holding their settings, not the Config.
    from mercure.services.runtime import build_runtime

    rt = build_runtime(config, plugin_manager, fsync=False)
    rt.start()
    try:
        assert sorted(ProbeSink.started) == ["probe", "second"]
        target = rt.target("t")
        assert target.config == ProbeTargetConfig(label="pacs")
        assert rt.notifier("slow").settings == SlowNotifierSettings(mode="raise")
        for instance in (target, rt.notifier("slow")):
            assert not any(isinstance(v, type(config)) for v in vars(instance).values())
    finally:
        rt.close()
    assert sorted(ProbeSink.closed) == ["probe", "second"]


@pytest.mark.parametrize(
    ("plugins", "path", "message"),
    [
        ({"runners": {"probe": {"workers": "many"}}}, "plugins.runners.probe.workers", "integer"),
        ({"runners": {"probe": {"wokers": 2}}}, "plugins.runners.probe.wokers", "Extra inputs"),
        ({"notifiers": {"slow": {"mode": "loud"}}}, "plugins.notifiers.slow.mode", "'hang'"),
        ({"metrics_sinks": {"x": {"type": "nope"}}}, "plugins.metrics_sinks.x.type", "install"),
        ({"runners": {"probe": {"token": "${env:NOT_SET_X}"}}}, "plugins.runners.probe.token",
         "NOT_SET_X"),
        ({"sinks": {}}, "plugins.sinks", "unknown kind"),
    ],
)  # fmt: skip
def test_a_wrong_plugin_setting_is_reported_with_its_path(
    tmp_path: Path,
    plugin_manager: PluginManager,
    site: Observer,
    plugins: dict[str, Any],
    path: str,
    message: str,
) -> None:
    data = {"process_runner": "probe", "plugins": plugins}
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    errors = dict(info.value.errors)
    assert path in errors, errors
    assert message in errors[path]


def test_the_runner_checks_every_module_at_load(
    plugin_manager: PluginManager, site: Observer
) -> None:
    data: dict[str, Any] = {
        "process_runner": "probe",
        "modules": {"ai": {"docker_tag": "x/ai:1", "docker_arguments": '{"privileged": true}'}},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    errors = dict(info.value.errors)
    assert errors["modules.ai.docker_arguments"] == "not allowed with 1 worker (runner 'probe')"
    data["plugins"] = {"runners": {"probe": {"workers": 2}}}
    validate_config(data, plugin_manager.registry)


def test_a_misspelled_rule_key_is_an_error_and_an_unrelated_one_a_warning(
    plugin_manager: PluginManager,
) -> None:
    data = {
        "rules": {
            "r": {"rule": "True", "action": "discard", "notification_trigger_eror": False},
            "s": {"rule": "True", "action": "discard", "site_owner": "radiology"},
        }
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    errors = dict(info.value.errors)
    assert (
        "did you mean 'notification_trigger_error'" in errors["rules.r.notification_trigger_eror"]
    )
    del data["rules"]["r"]
    _, warnings = validate_config(data, plugin_manager.registry)
    assert "rules.s.site_owner: unknown setting, ignored" in warnings


def test_mercure_flat_fields_configure_the_instances(plugin_manager: PluginManager) -> None:
    class GraphiteSettings(PluginSettings):
        host: str
        port: int = 2003
        prefix: str = "mercure"

    class Graphite(MetricsSink[GraphiteSettings]):
        def send(self, metrics: list[Metric]) -> None:
            pass

    class Plugin:
        @hookimpl
        def register_metrics_sinks(self, register: RegisterFn) -> None:
            register("graphite", GraphiteSettings, Graphite)

    plugin_manager.register(Plugin(), "graphite_site")
    try:
        data = {
            "graphite_ip": "10.0.0.5",
            "graphite_port": 2004,
            "plugins": {"metrics_sinks": {"graphite": {"prefix": "router"}}},
        }
        config, _ = validate_config(data, plugin_manager.registry)
        (sink,) = config.plugin_instances("metrics_sink")
        assert sink.settings == GraphiteSettings(host="10.0.0.5", port=2004, prefix="router")
        # Installed but not configured: no instance.
        config, _ = validate_config({}, plugin_manager.registry)
        assert config.plugin_instances("metrics_sink") == []
        with pytest.raises(ConfigError) as info:
            validate_config({"graphite_ip": "h", "graphite_port": "x"}, plugin_manager.registry)
        assert "graphite_port" in dict(info.value.errors)
    finally:
        plugin_manager.unregister("graphite_site")


# -- notifications and metrics never hold up a series ---------------------------------------------


@contextlib.contextmanager
def router(
    tmp_path: Path, plugin_manager: PluginManager, **overrides: Any
) -> Iterator[RunningRouter]:
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    config = config_for(
        tmp_path,
        _registry=plugin_manager.registry,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder", "notification_webhook": "http://x"}},
        notification_retry_delay=0.2,
        notification_retries=3,
        metrics_interval=0.5,
        dicom_receiver={"bind_address": "127.0.0.1"},
        **overrides,
    )
    gen = start_router(config, plugin_manager)
    running = next(gen)
    try:
        yield running
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


def send_series(tmp_path: Path, running: RunningRouter, count: int) -> list[Path]:
    files = make_series(tmp_path / f"series-{time.monotonic_ns()}", count, rows=8, columns=8)
    dcmtk_storescu(files, running.port)
    return files


def delivered_instances(tmp_path: Path) -> int:
    return sum(1 for _ in (tmp_path / "target").rglob("*.dcm"))


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hang", "raise"])
def test_a_hanging_or_failing_notifier_does_not_delay_delivery(
    tmp_path: Path, plugin_manager: PluginManager, site: Observer, mode: str
) -> None:
    """Delivery is compared with and without the slow notifier by events, not by timing."""
    plugins = {"notifiers": {"slow": {"mode": mode, "hang_seconds": 30}}}
    with router(tmp_path, plugin_manager, plugins=plugins) as running:
        send_series(tmp_path, running, 200)
        wait_for(lambda: site.of(TaskEventType.COMPLETED), timeout=120, what="delivery")
        assert delivered_instances(tmp_path) == 200
        if mode == "hang":
            # Delivered before any notification was finished: the series never waited for the
            # notifier, which (once the outbox worker picked it up) hangs on the reception.
            assert not site.of(TaskEventType.NOTIFICATION_GIVEN_UP)
            assert not site.of(TaskEventType.NOTIFICATION_SENT)
            assert SlowNotifier.inside.wait(30), "the notifier was never asked"
            assert not SlowNotifier.release.is_set()
            SlowNotifier.release.set()
        # The notifications are retried and finally recorded as given up (it never works).
        given_up = wait_for(
            lambda: len(site.of(TaskEventType.NOTIFICATION_GIVEN_UP)) >= 2 or None,
            timeout=60,
            what="notifications given up",
        )
        assert given_up
        records = running.supervisor.runtime.outbox.records(
            site.of(TaskEventType.COMPLETED)[0].task_id
        )
        assert {r["notification"]["event"] for r in records} == {"reception", "completion"}
        assert all(r["outcome"] == "given up" for r in records)
        assert all("gave up after 3 tries" in r["detail"] for r in records)
    # Baseline, the same series without a failing notifier: the same events, delivered.
    ok_root = tmp_path / "ok"
    ok_root.mkdir()
    site.events.clear()
    with router(ok_root, plugin_manager, plugins={"notifiers": {"slow": {}}}) as running:
        send_series(ok_root, running, 200)
        wait_for(lambda: site.of(TaskEventType.COMPLETED), timeout=120, what="delivery")
        assert delivered_instances(ok_root) == 200
        wait_for(lambda: len(SlowNotifier.sent) >= 2 or None, timeout=30, what="notifications")
    assert {n.event for n in SlowNotifier.sent} == {"reception", "completion"}


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "block"])
def test_a_failing_or_blocked_sink_costs_only_its_own_metrics(
    tmp_path: Path, plugin_manager: PluginManager, site: Observer, mode: str
) -> None:
    plugins = {"metrics_sinks": {"bad": {"type": "probe", "mode": mode}, "good": {"type": "probe"}}}
    with router(tmp_path, plugin_manager, plugins=plugins) as running:
        send_series(tmp_path, running, 200)
        wait_for(lambda: site.of(TaskEventType.COMPLETED), timeout=120, what="delivery")
        assert delivered_instances(tmp_path) == 200
        hub = running.supervisor.runtime.metrics_hub
        if mode == "raise":
            wait_for(lambda: hub.stats()["bad"].dropped_failed or None, timeout=10, what="drops")
            assert "carbon is down" in hub.stats()["bad"].last_error
        else:  # blocked in its first batch: everything after it waits in its own buffer
            assert hub.stats()["bad"].sent == 0
        wait_for(lambda: hub.stats()["good"].sent or None, timeout=10, what="good sink")
        assert hub.stats()["good"].dropped == 0


@pytest.mark.peer
@pytest.mark.slow
def test_a_recording_sink_sees_the_operators_metrics(
    tmp_path: Path, plugin_manager: PluginManager, site: Observer
) -> None:
    plugins = {"metrics_sinks": {"probe": {}}}
    with router(tmp_path, plugin_manager, plugins=plugins) as running:
        send_series(tmp_path, running, 20)
        wait_for(lambda: site.of(TaskEventType.COMPLETED), timeout=60, what="delivery")

        def names() -> set[str]:
            return {m.name for m in list(ProbeSink.recorded)}

        expected = {
            "events.boot",
            "incoming.series",
            "incoming.files",
            "jobs.created",
            "dispatch.instances",
            "jobs.completed",
            "dispatch.duration",
            "jobs.outgoing",
            "jobs.success",
            "jobs.error",
            "queue.incoming_series",
            "queue.notifications",
            "spool.free_bytes",
            "receiver.connections_accepted",
            "receiver.associations_active",
        }
        wait_for(lambda: expected <= names() or None, timeout=20, what=f"metrics {expected}")
        files = [m for m in ProbeSink.recorded if m.name == "incoming.files"]
        assert sum(m.value for m in files) == 20
        created = [m for m in ProbeSink.recorded if m.name == "jobs.created"]
        assert created[0].tags == {"action": "route"}
        delivered = [m for m in ProbeSink.recorded if m.name == "dispatch.instances"]
        assert sum(m.value for m in delivered) == 20
        assert delivered[0].tags == {"target": "folder"}
    assert "events.shutdown" in names()
