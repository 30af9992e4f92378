"""The sftp target's settings: mercure's fields load unchanged, bad values fail at load time.

The fields every SSH target shares, their defaults and checks are tested with the core
(``core/tests/test_ssh_settings.py``); here: that this target has them, and its own.
"""

from __future__ import annotations

import re

import mercure_target_sftp as plugin
import pytest
from mercure.config import validate_config
from mercure.plugins import build_plugin_manager
from mercure.ssh_settings import SSHFolderTargetConfig
from mercure_target_sftp.config import SftpTargetConfig
from pydantic import ValidationError

MERCURE = {"target_type": "sftp", "folder": "/data/in", "user": "mercure", "host": "sftp.example"}


def test_mercure_fields_and_defaults() -> None:
    cfg = SftpTargetConfig.model_validate(MERCURE)
    assert isinstance(cfg, SSHFolderTargetConfig)
    assert cfg.model_dump(include={"folder", "user", "host", "password", "port", "timeout"}) == {
        "folder": "/data/in",
        "user": "mercure",
        "host": "sftp.example",
        "password": None,
        "port": 22,
        "timeout": 30.0,
    }
    assert cfg.folder_pattern.text == "{task_id}" and cfg.file_pattern.text == "{filename}"


def test_registered_through_the_entry_point(plugin_manager, register_plugin) -> None:
    register_plugin(plugin, "target_sftp")
    entry = plugin_manager.registry.get("target", "sftp")
    assert entry.implementation is plugin.SftpTarget and entry.config_model is SftpTargetConfig


def test_a_mercure_configuration_loads_unchanged() -> None:
    registry = build_plugin_manager().registry
    data = {
        "targets": {"cluster": {**MERCURE, "password": "secret", "contact": "it@example"}},
        "rules": {"all": {"rule": "True", "target": "cluster"}},
    }
    config, _warnings = validate_config(data, registry)
    target = config.targets["cluster"]
    assert isinstance(target, SftpTargetConfig) and target.password == "secret"
    assert target.contact == "it@example"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timeout": 0}, "greater than 0"),
        ({"host_key_fingerprint": "ab:cd"}, "not an OpenSSH SHA256 fingerprint"),
        ({"folder_pattern": "{SOPInstanceUID}"}, "differs between the instances"),
        ({"key_passphrase": "pp"}, "no key_file or private_key"),
        ({"run_on_complete": True}, "Extra inputs are not permitted"),  # rsync's, not sftp's
    ],
)
def test_bad_settings_fail_when_the_configuration_loads(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        SftpTargetConfig.model_validate({**MERCURE, **change})
