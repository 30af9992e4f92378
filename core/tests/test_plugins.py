"""The plugin manager and the type registry: built-ins, entry points, site plugins, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from mercure import hookimpl
from mercure.config import ConfigError, validate_config
from mercure.events import TaskEvent, TaskEventType
from mercure.plugins import (
    CORE_DISTRIBUTION,
    ENV_ALLOW,
    ENV_DISABLE_AUTOLOAD,
    PluginManager,
    build_plugin_manager,
)
from mercure.registry import PluginRegistrationError, RegisterFn, UnknownTypeError
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig
from pydantic import BaseModel

BUILTIN_TYPES = {
    ("target", "folder"),
    ("target", "dummy"),
    ("receiver", "dicom"),
    ("runner", "local"),
    ("notifier", "log"),
    ("metrics_sink", "log"),
}


class EchoConfig(TargetConfig):
    target_type: Literal["echo"] = "echo"
    url: str


class EchoTarget(Target[EchoConfig]):
    def send(self, job: DeliveryJob) -> DeliveryResult:
        return DeliveryResult.all_delivered(job)


class EchoPlugin:
    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        register("echo", EchoConfig, EchoTarget)


def test_builtins_are_listed(plugin_manager: PluginManager) -> None:
    registry = plugin_manager.registry
    assert {(t.kind, t.name) for t in registry} == BUILTIN_TYPES
    for t in registry:
        assert t.distribution == CORE_DISTRIBUTION
    infos = plugin_manager.infos
    assert {i.source for i in infos.values()} == {"built-in"}
    assert plugin_manager.plugin_types("builtin_folder_target") == ["target:folder"]
    assert registry.get("target", "folder").config_model is not None


def test_registry_get_unknown_type_names_distribution(plugin_manager: PluginManager) -> None:
    with pytest.raises(UnknownTypeError) as info:
        plugin_manager.registry.get("target", "dicomweb")
    assert "pip install mercure-target-dicomweb" in str(info.value)
    with pytest.raises(UnknownTypeError) as info:
        plugin_manager.registry.get("notifier", "pager")
    assert "mercure-notifier-pager" in str(info.value)


def test_registered_plugin_adds_a_usable_target_type(
    plugin_manager: PluginManager, register_plugin: Any
) -> None:
    data = {"targets": {"e": {"target_type": "echo", "url": "http://x"}}}
    with pytest.raises(ConfigError):
        validate_config(data, plugin_manager.registry)
    register_plugin(EchoPlugin(), "echo_plugin")
    assert ("target", "echo") in {(t.kind, t.name) for t in plugin_manager.registry}
    entry = plugin_manager.registry.get("target", "echo")
    assert entry.plugin == "echo_plugin"
    assert entry.implementation is EchoTarget
    config, _ = validate_config(data, plugin_manager.registry)
    assert isinstance(config.targets["e"], EchoConfig)
    # The built-in types still validate next to it.
    config, _ = validate_config(
        {"targets": {**data["targets"], "d": {"target_type": "dummy"}}}, plugin_manager.registry
    )
    assert config.targets["d"].target_type == "dummy"


def test_unregister_removes_the_type(plugin_manager: PluginManager) -> None:
    plugin_manager.register(EchoPlugin(), "echo_plugin")
    assert "echo" in plugin_manager.registry.names("target")
    plugin_manager.unregister("echo_plugin")
    assert "echo" not in plugin_manager.registry.names("target")


def test_duplicate_type_names_both_distributions(plugin_manager: PluginManager) -> None:
    class FolderAgainConfig(TargetConfig):
        target_type: Literal["folder"] = "folder"

    class FolderAgain:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("folder", FolderAgainConfig, EchoTarget)

    plugin_manager.register(FolderAgain(), "folder_again", distribution="mercure-target-folder2")
    with pytest.raises(PluginRegistrationError) as info:
        _ = plugin_manager.registry
    message = str(info.value)
    assert "'folder'" in message
    assert CORE_DISTRIBUTION in message
    assert "mercure-target-folder2" in message


def test_misspelled_hook_fails_check(plugin_manager: PluginManager) -> None:
    class Typo:
        @hookimpl
        def register_target(self, register: RegisterFn) -> None:  # missing "s"
            register("echo", EchoConfig, EchoTarget)

    plugin_manager.check()  # the built-ins are fine
    plugin_manager.register(Typo(), "typo")
    with pytest.raises(PluginRegistrationError) as info:
        plugin_manager.check()
    assert "register_target" in str(info.value)
    assert "spelling" in str(info.value)


def test_implementation_must_subclass_target(plugin_manager: PluginManager) -> None:
    class NotATarget:
        def send(self, job: DeliveryJob) -> DeliveryResult:
            return DeliveryResult()

    class Bad:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("echo", EchoConfig, NotATarget)

    plugin_manager.register(Bad(), "bad")
    with pytest.raises(PluginRegistrationError) as info:
        _ = plugin_manager.registry
    assert "mercure.targets.Target" in str(info.value)
    assert "bad" in str(info.value)


def test_config_model_must_be_pydantic(plugin_manager: PluginManager) -> None:
    class Bad:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("echo", dict, EchoTarget)

    plugin_manager.register(Bad(), "bad")
    with pytest.raises(PluginRegistrationError, match="pydantic model"):
        _ = plugin_manager.registry


def test_target_model_literal_must_match_the_type_name(plugin_manager: PluginManager) -> None:
    """A model tagged with another name would make every config using the type fail oddly."""

    class Mismatch:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("xnat", EchoConfig, EchoTarget)  # EchoConfig says target_type "echo"

    plugin_manager.register(Mismatch(), "mismatch")
    with pytest.raises(PluginRegistrationError) as info:
        _ = plugin_manager.registry
    assert "target_type" in str(info.value)
    assert "'xnat'" in str(info.value)


def test_target_model_without_target_type_literal_is_rejected(
    plugin_manager: PluginManager,
) -> None:
    class NoTag(BaseModel):
        url: str

    class Plugin:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("notag", NoTag, EchoTarget)

    plugin_manager.register(Plugin(), "notag")
    with pytest.raises(PluginRegistrationError) as info:
        _ = plugin_manager.registry
    assert "TargetConfig" in str(info.value) or "target_type" in str(info.value)


# -- observers ---------------------------------------------------------------------------------


def test_failing_observer_does_not_propagate(plugin_manager: PluginManager) -> None:
    seen: list[TaskEvent] = []

    class Broken:
        @hookimpl
        def on_task_event(self, event: TaskEvent) -> None:
            raise RuntimeError("observer is broken")

    class Recorder:
        @hookimpl
        def on_task_event(self, event: TaskEvent) -> None:
            seen.append(event)

    # Registered on both sides of the broken one: pluggy calls the last registered first.
    plugin_manager.register(Recorder(), "rec1")
    plugin_manager.register(Broken(), "broken")
    plugin_manager.register(Recorder(), "rec2")
    event = TaskEvent(TaskEventType.ROUTED, "task-1", "1.2.3")
    plugin_manager.notify("on_task_event", event=event)
    assert seen == [event, event]


def test_failing_startup_observer_does_not_propagate(plugin_manager: PluginManager) -> None:
    calls: list[list[str]] = []

    class Broken:
        @hookimpl
        def on_startup(self, config: Any, services: list[str]) -> None:
            raise ValueError("boom")

    class Recorder:
        @hookimpl
        def on_startup(self, services: list[str]) -> None:  # may declare fewer arguments
            calls.append(services)

    plugin_manager.register(Broken(), "broken")
    plugin_manager.register(Recorder(), "rec")
    plugin_manager.notify("on_startup", config=None, services=["router"])
    assert calls == [["router"]]


# -- site plugins ------------------------------------------------------------------------------

SITE_PLUGIN = """
from typing import Literal
from mercure import hookimpl
from mercure.targets import DeliveryResult, Target, TargetConfig


class SiteConfig(TargetConfig):
    target_type: Literal["{name}"] = "{name}"
    share: str


class SiteTarget(Target[SiteConfig]):
    def send(self, job):
        return DeliveryResult.all_delivered(job)


@hookimpl
def register_targets(register):
    register("{name}", SiteConfig, SiteTarget)
"""


def test_site_plugin_folder_registers_types(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "hospital_share.py").write_text(SITE_PLUGIN.format(name="hospital_share"))
    (folder / "notes.txt").write_text("not a plugin")
    manager = build_plugin_manager(folder, autoload=False)
    entry = manager.registry.get("target", "hospital_share")
    assert entry.plugin == "site_hospital_share"
    assert str(folder / "hospital_share.py") in entry.distribution
    assert manager.infos["site_hospital_share"].source == "site"
    config, _ = validate_config(
        {"targets": {"s": {"target_type": "hospital_share", "share": "//srv/x"}}},
        manager.registry,
    )
    assert config.targets["s"].target_type == "hospital_share"


def test_broken_site_plugin_gives_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "broken.py").write_text("def register_targets(register:\n")
    with pytest.raises(PluginRegistrationError) as info:
        build_plugin_manager(folder, autoload=False)
    assert str(folder / "broken.py") in str(info.value)
    assert "SyntaxError" in str(info.value)

    (folder / "broken.py").write_text("import mercure_no_such_module_xyz\n")
    with pytest.raises(PluginRegistrationError) as info:
        build_plugin_manager(folder, autoload=False)
    assert "mercure_no_such_module_xyz" in str(info.value)


def test_site_plugin_with_misspelled_hook_fails_at_build(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "typo.py").write_text(
        "from mercure import hookimpl\n\n@hookimpl\ndef on_task_events(event):\n    pass\n"
    )
    with pytest.raises(PluginRegistrationError, match="on_task_events"):
        build_plugin_manager(folder, autoload=False)


def test_site_plugin_duplicating_a_builtin_names_both(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "dup.py").write_text(SITE_PLUGIN.format(name="dummy"))
    manager = build_plugin_manager(folder, autoload=False)
    with pytest.raises(PluginRegistrationError) as info:
        _ = manager.registry
    assert "dup.py" in str(info.value)
    assert CORE_DISTRIBUTION in str(info.value)


def test_missing_site_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PluginRegistrationError, match="does not exist"):
        build_plugin_manager(tmp_path / "nope", autoload=False)


# -- entry points ------------------------------------------------------------------------------


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real installed-looking distribution ``mercure-target-fakeep`` on sys.path."""
    root = tmp_path / "site-packages"
    dist_info = root / "mercure_target_fakeep-1.2.3.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mercure-target-fakeep\nVersion: 1.2.3\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[mercure]\ntarget_fakeep = mercure_target_fakeep\n"
    )
    (root / "mercure_target_fakeep.py").write_text(SITE_PLUGIN.format(name="fakeep"))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    return "mercure-target-fakeep"


def test_entry_point_plugin_is_loaded(fake_distribution: str) -> None:
    manager = build_plugin_manager()
    entry = manager.registry.get("target", "fakeep")
    assert entry.distribution == fake_distribution
    info = manager.infos["target_fakeep"]
    assert info.source == "entry point"
    assert info.version == "1.2.3"


def test_disable_autoload_is_honoured(
    fake_distribution: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    manager = build_plugin_manager()
    assert "fakeep" not in manager.registry.names("target")
    assert {i.source for i in manager.infos.values()} == {"built-in"}


@pytest.mark.parametrize(
    ("allow", "loaded"),
    [
        ("mercure-target-fakeep", True),
        ("mercure-target-other, MERCURE-TARGET-FAKEEP", True),
        ("mercure_target_fakeep", True),  # the same name, normalized as pip does
        ("mercure-target-other", False),
        ("", False),  # an empty allow-list allows nothing
    ],
)
def test_allow_list_is_honoured(
    fake_distribution: str, monkeypatch: pytest.MonkeyPatch, allow: str, loaded: bool
) -> None:
    monkeypatch.setenv(ENV_ALLOW, allow)
    manager = build_plugin_manager()
    assert ("fakeep" in manager.registry.names("target")) is loaded
    # The built-ins are always there.
    assert {"dummy", "folder"} <= set(manager.registry.names("target"))


def test_entry_point_that_fails_to_import_names_the_distribution(
    fake_distribution: str, tmp_path: Path
) -> None:
    (tmp_path / "site-packages" / "mercure_target_fakeep.py").write_text(
        "raise ImportError('needs libfoo')\n"
    )
    import sys

    sys.modules.pop("mercure_target_fakeep", None)
    with pytest.raises(PluginRegistrationError) as info:
        build_plugin_manager()
    assert fake_distribution in str(info.value)
    assert "needs libfoo" in str(info.value)
