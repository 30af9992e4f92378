"""Settings and module checks of the docker runner, when the configuration loads (no engine)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError, Module
from mercure.lifecycle import PluginContext
from mercure.testing import config_for
from mercure_runner_docker import DockerRunner, DockerRunnerSettings
from mercure_runner_docker.arguments import additional_volumes, docker_arguments, module_problems
from mercure_runner_docker.ownership import container_identity
from pydantic import ValidationError


def load(tmp_path: Path, modules: dict[str, Any], **runner: Any) -> list[tuple[str, str]]:
    """The errors of a configuration with these modules, run by the docker runner."""
    rules = {
        f"r_{name}": {"rule": "True", "action": "process", "processing_module": name}
        for name in modules
    }
    try:
        config_for(
            tmp_path,
            process_runner="docker",
            plugins={"runners": {"docker": runner}},
            modules=modules,
            rules=rules,
        )
    except ConfigError as exc:
        return list(exc.errors)
    return []


def test_disallowed_arguments_and_volumes_are_errors_at_their_path(tmp_path: Path) -> None:
    errors = load(
        tmp_path,
        {
            "ok": {
                "docker_tag": "ai:1",
                "docker_arguments": json.dumps({"mem_limit": "2g", "runtime": "nvidia"}),
                "additional_volumes": json.dumps(
                    {"/opt/mercure/processor_volumes/models": {"bind": "/models", "mode": "ro"}}
                ),
            },
            "bad": {
                "docker_tag": "ai:1",
                "docker_arguments": json.dumps(
                    {"privileged": True, "cap_add": ["SYS_ADMIN"], "network_mode": "host"}
                ),
                "additional_volumes": json.dumps({"/etc": {"bind": "/host-etc"}}),
            },
            "garbled": {"docker_tag": "ai:1", "docker_arguments": "{not json"},
            "no_tag": {"command": "/bin/true"},
        },
    )
    paths = sorted({path for path, _ in errors})
    assert paths == [
        "modules.bad.additional_volumes",
        "modules.bad.docker_arguments",
        "modules.garbled.docker_arguments",
        "modules.no_tag.docker_tag",
    ]
    text = "\n".join(f"{p}: {m}" for p, m in errors)
    assert "privileged: not an allowed docker argument" in text
    assert "cap_add: not an allowed docker argument" in text
    assert "network_mode: set by the docker runner itself" in text
    assert "/etc: not below an allowed folder (/opt/mercure/processor_volumes)" in text
    assert "must be a JSON object" in text
    assert "it has a command: that is what the local runner runs" in text


def test_the_allow_lists_are_the_operators(tmp_path: Path) -> None:
    modules = {
        "gpu": {
            "docker_tag": "ai:1",
            "docker_arguments": json.dumps({"ipc_mode": "shareable"}),
            "additional_volumes": json.dumps({"/data/models/x": {"bind": "/x"}}),
        }
    }
    assert len(load(tmp_path, modules)) == 2
    widened = load(
        tmp_path,
        modules,
        allowed_docker_arguments=["ipc_mode"],
        volume_bases=["/data/models"],
    )
    assert widened == []
    reserved = load(tmp_path, modules, allowed_docker_arguments=["user", "ipc_mode"])
    assert reserved and reserved[0][0].startswith("plugins.runners.docker.allowed_docker")
    assert "user: set by the runner itself" in reserved[0][1]


def test_volume_details_are_checked() -> None:
    settings = DockerRunnerSettings(volume_bases=["/srv/vol"])

    def problems(volumes: Any) -> list[str]:
        module = Module(docker_tag="x", additional_volumes=json.dumps(volumes))
        return [m for _f, m in additional_volumes(module, settings)[1]]

    assert problems({"/srv/vol/a": {"bind": "/a", "mode": "ro"}}) == []
    assert problems({"/srv/vol": "/a"}) == []  # the base itself, bind given as a string
    assert "not below" in problems({"/srv/vol/../etc": {"bind": "/a"}})[0]
    assert "not below" in problems({"/srv/volume2": {"bind": "/a"}})[0]
    assert "absolute path" in problems({"srv/vol/a": {"bind": "/a"}})[0]
    assert "overlaps mercure's own folders" in problems({"/srv/vol/a": {"bind": "/tmp/data"}})[0]
    assert "overlaps" in problems({"/srv/vol/a": {"bind": "/tmp"}})[0]
    assert (
        "'mode' must be one of ro, rw" in problems({"/srv/vol/a": {"bind": "/a", "mode": "x"}})[0]
    )
    assert "absolute folder in the container" in problems({"/srv/vol/a": {"bind": "a"}})[0]


def test_only_allowed_arguments_are_passed_on() -> None:
    settings = DockerRunnerSettings()
    module = Module(docker_tag="x", docker_arguments='{"shm_size": "1g", "privileged": true}')
    passed, problems = docker_arguments(module, settings)
    assert passed == {"shm_size": "1g"}
    assert [f for f, _m in problems] == ["docker_arguments"]
    empty = Module(docker_tag="x", docker_arguments="")
    assert docker_arguments(empty, settings) == ({}, [])
    assert (
        "must be a JSON object, not list"
        in docker_arguments(Module(docker_tag="x", docker_arguments="[1]"), settings)[1][0][1]
    )


def test_a_module_may_choose_its_pull_policy() -> None:
    settings = DockerRunnerSettings()
    assert module_problems(Module(docker_tag="x", pull_policy="hourly"), settings) == []
    assert module_problems(Module(docker_tag="x", pull_policy="sometimes"), settings) == [
        ("pull_policy", "must be one of never, missing, hourly, always")
    ]
    assert DockerRunner.check_module(None, "m", Module(docker_tag="x")) == []


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="numeric uid"):
        DockerRunnerSettings(user="mercure")
    with pytest.raises(ValidationError, match="go together"):
        DockerRunnerSettings(tls_client_cert="/c.pem")
    with pytest.raises(ValidationError, match="not an absolute folder"):
        DockerRunnerSettings(volume_bases=["relative"])
    with pytest.raises(ValidationError, match="Extra inputs"):
        DockerRunnerSettings(docker_host="x")
    assert DockerRunnerSettings(tls_ca_cert="/ca.pem").uses_tls


def test_whom_a_container_runs_as() -> None:
    default = container_identity(DockerRunnerSettings(), as_root=False)
    if os.geteuid() == 0:
        assert default.docker_user == "65534:65534"
    else:
        assert default.docker_user == f"{os.geteuid()}:{os.getegid()}"
    assert container_identity(DockerRunnerSettings(user="1000"), False).docker_user == "1000:1000"
    assert container_identity(DockerRunnerSettings(user="7:8"), False).docker_user == "7:8"
    assert container_identity(DockerRunnerSettings(user="7:8"), True).docker_user is None


def test_bind_sources_follow_host_paths() -> None:
    settings = DockerRunnerSettings(
        host_paths={"/opt/mercure/data": "/srv/mercure", "/opt/mercure/data/processing": "/fast"}
    )
    runner = DockerRunner("docker", settings, PluginContext("runner", "docker"))
    assert runner._host(Path("/opt/mercure/data/success/x")) == "/srv/mercure/success/x"
    assert runner._host(Path("/opt/mercure/data/processing/j/in")) == "/fast/j/in"
    assert runner._host(Path("/opt/mercure/database")) == "/opt/mercure/database"


def test_a_wrong_handle_is_a_runner_error() -> None:
    from mercure.runners import RunnerError

    runner = DockerRunner("docker", DockerRunnerSettings(), PluginContext("runner", "docker"))
    with pytest.raises(RunnerError, match="not a handle of the docker runner"):
        runner.wait("{}", 0)
