"""mercure.json loading: mercure's fields and defaults, plugin target types, errors with paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import pytest
from mercure import hookimpl
from mercure.config import (
    Config,
    ConfigError,
    default_config_data,
    load_config,
    validate_config,
)
from mercure.plugins import PluginManager
from mercure.registry import RegisterFn, Registry
from mercure.secrets import Secret
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig

DATA = Path(__file__).parent / "data"
FULL = DATA / "mercure_full.json"

# mercure's configuration/default_mercure.json plus the defaults of common.types.Config.
MERCURE_DEFAULTS: dict[str, Any] = {
    "appliance_name": "master",
    "port": 11112,
    "accept_compressed_images": False,
    "incoming_folder": "/opt/mercure/data/incoming",
    "studies_folder": "/opt/mercure/data/studies",
    "outgoing_folder": "/opt/mercure/data/outgoing",
    "success_folder": "/opt/mercure/data/success",
    "error_folder": "/opt/mercure/data/error",
    "discard_folder": "/opt/mercure/data/discard",
    "processing_folder": "/opt/mercure/data/processing",
    "router_scan_interval": 1,
    "dispatcher_scan_interval": 1,
    "cleaner_scan_interval": 60,
    "retention": 259200,
    "emergency_clean_percentage": 90,
    "retry_delay": 900,
    "retry_max": 5,
    "series_complete_trigger": 60,
    "study_complete_trigger": 900,
    "study_forcecomplete_trigger": 5400,
    "graphite_ip": "",
    "graphite_port": 2003,
    "influxdb_host": "",
    "influxdb_token": "",
    "influxdb_org": "",
    "influxdb_bucket": "",
    "bookkeeper": "0.0.0.0:8080",
    "offpeak_start": "22:00",
    "offpeak_end": "06:00",
    "targets": {},
    "rules": {},
    "modules": {},
    "process_runner": "",
    "processing_runtime": None,
    "bookkeeper_api_key": None,
    "features": {},
    "processing_logs": {"discard_logs": False, "logs_file_store": None},
    "email_notification_from": "mercure@mercure.mercure",
    "support_root_modules": False,
    "webhook_certificate_location": None,
}

# common.types.Rule defaults.
MERCURE_RULE_DEFAULTS: dict[str, Any] = {
    "rule": "False",
    "target": "",
    "disabled": False,
    "fallback": False,
    "contact": "",
    "comment": "",
    "tags": "",
    "action": "route",
    "action_trigger": "series",
    "study_trigger_condition": "timeout",
    "study_trigger_series": "",
    "study_force_completion_action": "discard",
    "priority": "normal",
    "processing_module": "",
    "processing_settings": {},
    "processing_retain_images": False,
    "notification_email": "",
    "notification_webhook": "",
    "notification_payload": "",
    "notification_payload_body": "",
    "notification_email_body": "",
    "notification_email_type": "plain",
    "notification_trigger_reception": True,
    "notification_trigger_completion": True,
    "notification_trigger_completion_on_request": False,
    "notification_trigger_error": True,
    # mercure 0.4
    "dynamic_routing": False,
    "dynamic_routing_allowed_targets": [],
}

# common.types.Module defaults.
MERCURE_MODULE_DEFAULTS: dict[str, Any] = {
    "docker_tag": "",
    "additional_volumes": "",
    "environment": "",
    "docker_arguments": "",
    "settings": {},
    "contact": "",
    "comment": "",
    "constraints": "",
    "resources": "",
    "requires_root": False,
    # mercure 0.4
    "requires_persistence": False,
    "network_enabled": False,
    # added by this project, for the local runner and the processor
    "command": "",
    "timeout": 14400.0,
}


@pytest.fixture
def registry(plugin_manager: PluginManager) -> Registry:
    return plugin_manager.registry


def full_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FULL.read_text())
    return data


def errors_of(data: dict[str, Any], registry: Registry) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_config(data, registry)
    paths = [path for path, _ in info.value.errors]
    assert len(paths) == len(set(paths)), f"an error path is reported twice: {paths}"
    return dict(info.value.errors)


# -- a complete mercure.json -------------------------------------------------------------------


def test_full_mercure_json_loads_unchanged(registry: Registry) -> None:
    data = full_data()
    config, warnings = load_config(FULL, registry)

    dumped = config.model_dump(mode="json")
    for key, value in data.items():
        if key in ("targets", "rules", "modules"):
            continue
        if isinstance(value, dict) and key != "features":
            # Sections this project extends (dicom_receiver): mercure's fields are unchanged.
            assert {k: dumped[key][k] for k in value} == value, key
        else:
            assert dumped[key] == value, key
    # Every target keeps every field it was written with, and nothing else is invented.
    assert set(config.targets) == set(data["targets"])
    for name, target in data["targets"].items():
        # mercure 0.4 added "direction" (default "push") to every target.
        assert config.targets[name].model_dump(mode="json") == {"direction": "push", **target}
    assert config.targets["archive_folder"].target_type == "folder"
    assert type(config.targets["test_dummy"]).__name__ == "DummyTargetConfig"
    # Rules: written fields unchanged, the others get mercure's defaults.
    assert list(config.rules) == list(data["rules"])
    for name, rule in data["rules"].items():
        got = config.rules[name].model_dump(mode="json")
        assert got == {**MERCURE_RULE_DEFAULTS, **rule}, name
    for name, module in data["modules"].items():
        got = config.modules[name].model_dump(mode="json")
        assert got == {**MERCURE_MODULE_DEFAULTS, **module}, name
    assert config.dicom_receiver.additional_tags == {
        "ImageOrientationPatient": "(0020,0037)",
        "ConvolutionKernel": "(0018,1210)",
    }
    assert config.features == {"dummy_target": True}
    assert config.processing_logs.discard_logs is True
    assert config.rules["ai_lung"].targets == ["test_dummy"]
    assert config.rules["ai_lung"].modules == ["lung_ai", "anonymizer"]
    # Study-level rules load without a warning; with the core alone, each backend that
    # mercure's fields ask for names the distribution to install.
    assert not [w for w in warnings if w.startswith("rules.study_rule")]
    missing = {w.split(":", 1)[0]: w for w in warnings if "no installed plugin" in w}
    assert set(missing) == {
        "graphite_ip",
        "influxdb_host",
        "rules.route_ct.notification_webhook",
        "rules.route_ct.notification_email",
    }
    assert "pip install mercure-metrics-graphite" in missing["graphite_ip"]
    assert "pip install mercure-notifier-email" in missing["rules.route_ct.notification_email"]
    # Its container modules need a container runner (mercure's empty process_runner: Docker).
    containers = sorted(w.split(":", 1)[0] for w in warnings if "container module" in w)
    assert containers == ["modules.anonymizer", "modules.lung_ai"]
    assert all("mercure-runner-docker" in w for w in warnings if "container module" in w)
    assert len(warnings) == 6


def test_full_mercure_json_survives_a_dump_and_reload(registry: Registry) -> None:
    config, _ = load_config(FULL, registry)
    again, _ = validate_config(config.model_dump(mode="json"), registry)
    assert again.model_dump() == config.model_dump()


def test_empty_config_gets_mercures_defaults(registry: Registry) -> None:
    config, warnings = validate_config({}, registry)
    assert warnings == []
    dumped = config.model_dump(mode="json")
    for key, value in MERCURE_DEFAULTS.items():
        assert dumped[key] == value, key
    assert config.dicom_receiver.additional_tags == {}
    assert config.folder("outgoing") == Path("/opt/mercure/data/outgoing")


def test_a_rule_with_no_fields_has_mercures_defaults(registry: Registry) -> None:
    config, _ = validate_config({"rules": {"r": {"disabled": True}}}, registry)
    assert config.rules["r"].model_dump(mode="json") == {
        **MERCURE_RULE_DEFAULTS,
        "disabled": True,
    }


def test_mercure_defaults_file_validates(registry: Registry) -> None:
    """mercure's own configuration/default_mercure.json (with the bookkeeper placeholder)."""
    data = {k: v for k, v in MERCURE_DEFAULTS.items() if v is not None}
    data["bookkeeper_api_key"] = "BOOKKEEPER_TOKEN_PLACEHOLDER"
    config, warnings = validate_config(data, registry)
    assert warnings == []
    assert config.bookkeeper_api_key == "BOOKKEEPER_TOKEN_PLACEHOLDER"


# -- target types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttype", "hint"),
    [
        ("xnat", "pip install mercure-target-xnat"),
        ("s3", "pip install mercure-target-s3"),
        ("sftp", "pip install mercure-target-sftp"),
        ("foo", "mercure-target-foo"),
    ],
)
def test_target_type_without_plugin_names_the_distribution(
    registry: Registry, ttype: str, hint: str
) -> None:
    errors = errors_of({"targets": {"remote": {"target_type": ttype, "host": "h"}}}, registry)
    assert list(errors) == ["targets.remote.target_type"]
    message = errors["targets.remote.target_type"]
    assert hint in message
    assert f"'{ttype}'" in message
    # It tells what is installed.
    assert "dummy" in message and "folder" in message


def test_unknown_target_types_are_all_reported(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {
                "x": {"target_type": "xnat"},
                "s": {"target_type": "s3"},
                "f": {"target_type": "foo"},
                "ok": {"target_type": "folder", "folder": "/tmp"},
            }
        },
        registry,
    )
    assert set(errors) == {
        "targets.x.target_type",
        "targets.s.target_type",
        "targets.f.target_type",
    }


def test_target_without_type_is_a_dicom_target(
    registry: Registry, register_plugin: Any, plugin_manager: PluginManager
) -> None:
    # Without a dicom plugin: the error says to install the dicom target.
    errors = errors_of(
        {"targets": {"pacs": {"ip": "10.0.0.1", "port": "104", "aet_target": "PACS"}}}, registry
    )
    assert "pip install mercure-target-dicom" in errors["targets.pacs.target_type"]

    class DicomConfig(TargetConfig):
        target_type: Literal["dicom"] = "dicom"
        ip: str
        port: str
        aet_target: str
        aet_source: str | None = ""

    class Plugin:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("dicom", DicomConfig, _NullTarget)

    register_plugin(Plugin(), "fake_dicom")
    config, _ = validate_config(
        {"targets": {"pacs": {"ip": "10.0.0.1", "port": "104", "aet_target": "PACS"}}},
        plugin_manager.registry,
    )
    target = config.targets["pacs"]
    assert isinstance(target, DicomConfig)
    assert target.target_type == "dicom"
    assert target.aet_source == ""


class _NullTarget(Target[Any]):
    def send(self, job: DeliveryJob) -> DeliveryResult:
        return DeliveryResult.all_delivered(job)


# -- field errors ------------------------------------------------------------------------------


def test_field_errors_have_json_paths_and_are_all_reported(registry: Registry) -> None:
    errors = errors_of(
        {
            "port": "eleven",
            "retry_max": [],
            "targets": {
                "t": {"target_type": "folder"},
                "d": {"target_type": "dummy", "ip": "1.2.3.4"},
            },
            "rules": {"r": {"rule": "True", "target": "t", "action": "forward"}},
            "dicom_receiver": {"additional_tags": {"X": 5}},
        },
        registry,
    )
    assert set(errors) == {
        "port",
        "retry_max",
        "targets.t.folder",
        "targets.d.ip",
        "rules.r.action",
        "dicom_receiver.additional_tags.X",
    }
    assert "integer" in errors["port"]
    assert "required" in errors["targets.t.folder"].lower()
    assert "'route'" in errors["rules.r.action"] and "'discard'" in errors["rules.r.action"]


def test_union_fields_report_one_error_at_their_json_path(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {"t": {"target_type": "dummy"}},
            "rules": {"r": {"rule": "True", "target": 5, "processing_settings": "x"}},
        },
        registry,
    )
    # Not "rules.r.target.str" and "rules.r.target.list[str]": those are not JSON paths.
    assert set(errors) == {"rules.r.target", "rules.r.processing_settings"}
    assert "valid string" in errors["rules.r.target"]
    assert "valid list" in errors["rules.r.target"]


def test_config_error_message_lists_every_error(registry: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(
            {"port": "x", "targets": {"t": {"target_type": "folder"}}}, registry, "site.json"
        )
    text = str(info.value)
    assert "site.json" in text
    assert "2 error(s)" in text
    assert "  port: " in text
    assert "  targets.t.folder: " in text


def test_rules_naming_missing_targets_and_modules(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {"t": {"target_type": "dummy"}},
            "rules": {
                "two": {"rule": "True", "target": ["t", "nope"]},
                "proc": {"rule": "True", "action": "process", "processing_module": "ai"},
                "both": {
                    "rule": "True",
                    "action": "both",
                    "target": "gone",
                    "processing_module": ["ai2"],
                },
                "empty": {"rule": "True", "action": "route", "target": ""},
            },
        },
        registry,
    )
    assert set(errors) == {
        "rules.two.target",
        "rules.proc.processing_module",
        "rules.both.target",
        "rules.both.processing_module",
        "rules.empty.target",
    }
    assert "'nope'" in errors["rules.two.target"]
    assert "'ai'" in errors["rules.proc.processing_module"]
    assert "'gone'" in errors["rules.both.target"]
    assert "needs a target" in errors["rules.empty.target"]


def test_processing_rules_need_a_module(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {"t": {"target_type": "dummy"}},
            "rules": {
                "p": {"rule": "True", "action": "process"},
                "b": {"rule": "True", "action": "both", "target": "t", "processing_module": []},
                "off": {"rule": "True", "action": "process", "disabled": True},
            },
        },
        registry,
    )
    assert set(errors) == {"rules.p.processing_module", "rules.b.processing_module"}
    assert "needs a processing module" in errors["rules.p.processing_module"]


def test_forbidden_rule_expression_is_an_error_with_column(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {"t": {"target_type": "dummy"}},
            "rules": {
                "evil": {"rule": "tags.Modality == 'CT' or __import__('os')", "target": "t"},
                "dunder": {"rule": "().__class__", "target": "t"},
            },
        },
        registry,
    )
    assert set(errors) == {"rules.evil.rule", "rules.dunder.rule"}
    assert "column 26" in errors["rules.evil.rule"]
    assert "__import__" in errors["rules.evil.rule"]
    assert "column" in errors["rules.dunder.rule"]


def test_rule_syntax_error_is_reported(registry: Registry) -> None:
    errors = errors_of(
        {
            "targets": {"t": {"target_type": "dummy"}},
            "rules": {"r": {"rule": "tags.X ==", "target": "t"}},
        },
        registry,
    )
    assert list(errors) == ["rules.r.rule"]


def test_disabled_rule_may_have_no_target(registry: Registry) -> None:
    config, _ = validate_config({"rules": {"off": {"rule": "True", "disabled": True}}}, registry)
    assert config.rules["off"].disabled


def test_unknown_process_runner_names_the_distribution(registry: Registry) -> None:
    errors = errors_of({"process_runner": "docker"}, registry)
    assert "pip install mercure-runner-docker" in errors["process_runner"]


def test_unknown_top_level_keys_are_warnings(registry: Registry) -> None:
    config, warnings = validate_config({"retention": 10, "ui_theme": "dark", "zzz": {}}, registry)
    assert config.retention == 10
    assert warnings == ["ui_theme: unknown setting, ignored", "zzz: unknown setting, ignored"]


def test_a_dummy_target_warns_unless_features_dummy_target(registry: Registry) -> None:
    data: dict[str, Any] = {"targets": {"void": {"target_type": "dummy"}}}
    _config, warnings = validate_config(data, registry)
    assert [w for w in warnings if w.startswith("targets.void:")] == [
        "targets.void: a dummy target delivers nothing (its jobs succeed at once); "
        "mercure offers the type only with features.dummy_target: true"
    ]
    _config, warnings = validate_config({**data, "features": {"dummy_target": True}}, registry)
    assert not [w for w in warnings if w.startswith("targets.void:")]


def test_load_config_reports_bad_json_and_missing_file(tmp_path: Path, registry: Registry) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"port": 11112,,}')
    with pytest.raises(ConfigError) as info:
        load_config(bad, registry)
    assert info.value.errors[0][0] == "(file)"
    assert "line 1" in info.value.errors[0][1]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.json", registry)
    assert info.value.errors[0][0] == "(file)"
    arr = tmp_path / "array.json"
    arr.write_text("[]")
    with pytest.raises(ConfigError) as info:
        load_config(arr, registry)
    assert info.value.errors == [("(root)", "must be a JSON object")]


# -- secrets -----------------------------------------------------------------------------------


def test_env_and_file_secrets_resolve(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERCURE_TEST_INFLUX", "tok-123")
    key_file = tmp_path / "bookkeeper.key"
    key_file.write_text("bk-secret\n")
    config, _ = validate_config(
        {
            "influxdb_token": "${env:MERCURE_TEST_INFLUX}",
            "bookkeeper_api_key": f"${{file:{key_file}}}",
        },
        registry,
    )
    assert config.influxdb_token == "tok-123"
    assert config.bookkeeper_api_key == "bk-secret"


def test_plain_secret_values_are_kept(registry: Registry) -> None:
    config, _ = validate_config({"influxdb_token": "plain$value{x}"}, registry)
    assert config.influxdb_token == "plain$value{x}"


def test_missing_secret_variable_is_a_clear_error(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERCURE_TEST_NOT_SET", raising=False)
    errors = errors_of(
        {
            "influxdb_token": "${env:MERCURE_TEST_NOT_SET}",
            "bookkeeper_api_key": f"${{file:{tmp_path / 'nope.key'}}}",
        },
        registry,
    )
    assert set(errors) == {"influxdb_token", "bookkeeper_api_key"}
    assert "MERCURE_TEST_NOT_SET" in errors["influxdb_token"]
    assert "not set" in errors["influxdb_token"]
    assert "nope.key" in errors["bookkeeper_api_key"]


class SecretTargetConfig(TargetConfig):
    target_type: Literal["secretive"] = "secretive"
    user: str
    password: Secret


class SecretPlugin:
    @hookimpl
    def register_targets(self, register: RegisterFn) -> None:
        register("secretive", SecretTargetConfig, _NullTarget)


def test_plugin_secret_field_resolves(
    tmp_path: Path,
    plugin_manager: PluginManager,
    register_plugin: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_plugin(SecretPlugin(), "secretive")
    monkeypatch.setenv("MERCURE_TEST_PW", "hunter2")
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file")
    config, _ = validate_config(
        {
            "targets": {
                "a": {
                    "target_type": "secretive",
                    "user": "u",
                    "password": "${env:MERCURE_TEST_PW}",
                },
                "b": {"target_type": "secretive", "user": "u", "password": f"${{file:{pw_file}}}"},
            }
        },
        plugin_manager.registry,
    )
    a, b = config.targets["a"], config.targets["b"]
    assert isinstance(a, SecretTargetConfig) and isinstance(b, SecretTargetConfig)
    assert a.password == "hunter2"
    assert b.password == "from-file"

    monkeypatch.delenv("MERCURE_TEST_PW")
    errors = errors_of(
        {
            "targets": {
                "a": {"target_type": "secretive", "user": "u", "password": "${env:MERCURE_TEST_PW}"}
            }
        },
        plugin_manager.registry,
    )
    assert list(errors) == ["targets.a.password"]
    assert "MERCURE_TEST_PW" in errors["targets.a.password"]


# -- the built-in default ----------------------------------------------------------------------


def test_default_config_routes_everything_to_the_folder_target(
    tmp_path: Path, registry: Registry
) -> None:
    data = default_config_data(tmp_path / "data")
    snapshot = copy.deepcopy(data)
    config, warnings = validate_config(data, registry)
    assert data == snapshot, "validation must not modify its input"
    assert warnings == []
    assert list(config.targets) == ["local_folder"]
    target = config.targets["local_folder"]
    assert target.target_type == "folder"
    assert Path(target.model_dump()["folder"]) == (tmp_path / "data" / "target").resolve()
    enabled = [r for r in config.rules.values() if not r.disabled]
    assert len(enabled) == 1
    assert enabled[0].action == "route"
    assert enabled[0].targets == ["local_folder"]
    for state in ("incoming", "outgoing", "success", "error", "discard", "processing"):
        assert config.folder(state) == (tmp_path / "data" / state).resolve()

    from mercure.services.router import evaluate_rules

    decision = evaluate_rules(config, {})
    assert decision.triggered == ["route_all"]
    assert decision.discard_rule is None


def test_validation_does_not_modify_input(registry: Registry) -> None:
    data = {"targets": {"pacs": {"ip": "1.2.3.4", "port": "104", "aet_target": "X"}}}
    snapshot = copy.deepcopy(data)
    with pytest.raises(ConfigError):
        validate_config(data, registry)
    assert data == snapshot


def test_config_class_is_mercures_model() -> None:
    # mercure code reads these attribute names; they must all exist on the model.
    for name in MERCURE_DEFAULTS:
        assert name in Config.model_fields, name


def test_an_untyped_target_gets_the_first_type_it_fits_in_mercures_order(
    plugin_manager: PluginManager, register_plugin: Any
) -> None:
    """mercure's own test configuration has an sftp target given as folder, user and host."""

    class SftpConfig(TargetConfig):
        target_type: Literal["sftp"] = "sftp"
        folder: str
        user: str
        host: str
        password: str | None = None

    class Plugin:
        @hookimpl
        def register_targets(self, register: RegisterFn) -> None:
            register("sftp", SftpConfig, _NullTarget)

    register_plugin(Plugin(), "fake_sftp")
    config, _ = validate_config(
        {
            "targets": {
                "cluster": {"folder": "/in", "user": "u", "host": "h"},
                "local": {"folder": "/data/out"},
            }
        },
        plugin_manager.registry,
    )
    assert config.targets["cluster"].target_type == "sftp"
    assert config.targets["local"].target_type == "folder"
