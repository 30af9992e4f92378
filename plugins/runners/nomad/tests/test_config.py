"""Configuring the nomad runner: its settings, and the modules it can run, checked at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError, Module
from mercure.plugins import build_plugin_manager
from mercure.testing import config_for
from mercure_runner_nomad import NomadRunner, NomadRunnerSettings
from mercure_runner_nomad.hcl import HclError, parse_constraints, parse_resources
from pydantic import ValidationError


def nomad_config(tmp_path: Path, modules: dict[str, Any], **settings: Any) -> Any:
    return config_for(
        tmp_path,
        process_runner="nomad",
        plugins={"runners": {"nomad": {"address": "http://127.0.0.1:4646", **settings}}},
        modules=modules,
        rules={
            "r": {"rule": "True", "action": "process", "processing_module": next(iter(modules))}
        },
    )


def test_the_plugin_is_found_by_its_entry_point(tmp_path: Path) -> None:
    manager = build_plugin_manager(autoload=True)
    assert manager.registry.get("runner", "nomad").implementation is NomadRunner
    config = nomad_config(tmp_path, {"ai": {"docker_tag": "example/ai:2"}}, namespace="imaging")
    (instance,) = config.plugin_instances("runner")
    assert instance.type_name == "nomad"
    assert isinstance(instance.settings, NomadRunnerSettings)
    assert instance.settings.namespace == "imaging"
    assert instance.settings.datacenters == ["*"]


def test_modules_nomad_cannot_run_are_errors_at_load_with_their_path(tmp_path: Path) -> None:
    modules = {
        "no_image": {"command": "run.sh"},
        "docker_args": {"docker_tag": "a:1", "docker_arguments": '{"shm_size": "2g"}'},
        "volumes": {"docker_tag": "a:1", "additional_volumes": '{"/data": {"bind": "/d"}}'},
        "bad_resources": {"docker_tag": "a:1", "resources": "memory = lots"},
        "bad_constraints": {"docker_tag": "a:1", "constraints": 'spread { attribute = "x" }'},
        "good": {
            "docker_tag": "a:1",
            "resources": 'cpu = 2000\nmemory = 4096\ndevice "nvidia/gpu" {\n count = 1\n}',
            "constraints": 'constraint {\n attribute = "${meta.gpu}"\n operator = "is_set"\n}',
        },
    }
    with pytest.raises(ConfigError) as raised:
        nomad_config(tmp_path, modules)
    errors = dict(raised.value.errors)
    assert "no docker_tag" in errors["modules.no_image.docker_tag"]
    assert "task_config" in errors["modules.docker_args.docker_arguments"]
    assert "not supported" in errors["modules.volumes.additional_volumes"]
    assert "whole number" in errors["modules.bad_resources.resources"]
    assert "spread is not supported" in errors["modules.bad_constraints.constraints"]
    assert not [path for path in errors if path.startswith("modules.good")]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"address": "nomad.example.org:4646"}, "http:// or https://"),
        ({"shared_folders": {"relative/path": "/mnt"}}, "must be absolute"),
        ({"task_config": {"image": "other"}}, "cannot be set here"),
        ({"client_cert": "/etc/c.pem"}, "client_cert and client_key go together"),
        ({"constraints": 'constraint { value = "x" }'}, "attribute is missing"),
        ({"placement_timeout": 0}, "greater than 0"),
        ({"driver": "exec"}, "docker"),
        ({"tokn": "x"}, "Extra inputs are not permitted"),
        ({"token": "${env:NO_SUCH_VARIABLE_FOR_NOMAD}"}, "NO_SUCH_VARIABLE_FOR_NOMAD is not set"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NomadRunnerSettings.model_validate(settings)


def test_token_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "nomad-token"
    secret.write_text("abc-123\n")
    settings = NomadRunnerSettings.model_validate({"token": f"${{file:{secret}}}"})
    assert settings.token == "abc-123"


def test_resources_are_mapped_to_nomads_api_fields() -> None:
    parsed = parse_resources(
        """
        cores = 2
        memory = 4096  # MB
        memory_max = 8192
        device "nvidia/gpu" {
          count = 2
          constraint {
            attribute = "${device.attr.memory}"
            operator  = ">="
            value     = "8 GiB"
          }
        }
        """
    )
    assert parsed == {
        "Cores": 2,
        "MemoryMB": 4096,
        "MemoryMaxMB": 8192,
        "Devices": [
            {
                "Name": "nvidia/gpu",
                "Count": 2,
                "Constraints": [
                    {"LTarget": "${device.attr.memory}", "RTarget": "8 GiB", "Operand": ">="}
                ],
            }
        ],
    }
    assert parse_resources("resources {\n cpu = 100\n}") == {"CPU": 100}  # the whole block
    assert parse_resources("") == {} and parse_resources(None) == {}


def test_constraints_and_affinities_with_nomads_shorthands() -> None:
    constraints, affinities = parse_constraints(
        """
        constraint {
          attribute = "${attr.kernel.name}"
          value     = "linux"
        }
        constraint {
          attribute = "${attr.nomad.version}"
          version   = ">= 1.6"
        }
        constraint {
          distinct_hosts = true
        }
        constraint {
          distinct_hosts = false
        }
        affinity {
          attribute = "${node.datacenter}"
          value     = "gpu-dc"
          weight    = 80
        }
        """
    )
    assert constraints == [
        {"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="},
        {"LTarget": "${attr.nomad.version}", "RTarget": ">= 1.6", "Operand": "version"},
        {"LTarget": "", "RTarget": "", "Operand": "distinct_hosts"},
    ]
    assert affinities == [
        {"LTarget": "${node.datacenter}", "RTarget": "gpu-dc", "Operand": "=", "Weight": 80}
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu = ", "is not valid HCL"),
        ("cpu = 1\ncores = 2", "both cpu and cores"),
        ("disk = 5", "disk is not supported"),
        ("memory = -5", "must not be negative"),
        ('memory = "256"', "whole number"),
        ("device {\n count = 1\n}", "needs a name"),
        ('device "gpu" {\n colour = "red"\n}', "unknown key(s) colour"),
    ],
)
def test_bad_resources(text: str, message: str) -> None:
    with pytest.raises(HclError) as raised:
        parse_resources(text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("constraint {\n attribute = attr.kernel.name\n}", "must be a quoted string"),
        ('constraint {\n attribute = "a"\n colour = "b"\n}', "unknown key(s) colour"),
        ('affinity {\n attribute = "a"\n weight = 500\n}', "from -100 to 100"),
        ('constraint = "x"', "must be written as a block"),
    ],
)
def test_bad_constraints(text: str, message: str) -> None:
    with pytest.raises(HclError) as raised:
        parse_constraints(text)
    assert message in str(raised.value)


def test_check_module_without_configured_settings() -> None:
    assert NomadRunner.check_module(None, "m", Module(docker_tag="a:1")) == []
