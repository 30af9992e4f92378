"""The sftp target's settings: an existing mercure.json loads unchanged, bad values fail.

What it shares with every SSH target (``mercure.ssh_settings``: login, host key, layout,
their defaults and checks) is tested in the core; here only that it has them, and its timeout.
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


def test_the_entry_point_registers_sftp_and_mercure_json_loads_unchanged() -> None:
    registry = build_plugin_manager().registry  # the installed entry points, as at start
    entry = registry.get("target", "sftp")
    assert entry.implementation is plugin.SftpTarget and entry.config_model is SftpTargetConfig
    data = {
        "targets": {"cluster": {**MERCURE, "password": "secret", "contact": "it@example"}},
        "rules": {"all": {"rule": "True", "target": "cluster"}},
    }
    config, _warnings = validate_config(data, registry)
    target = config.targets["cluster"]
    assert isinstance(target, SftpTargetConfig) and isinstance(target, SSHFolderTargetConfig)
    assert target.model_dump(include=set(MERCURE)) == MERCURE
    assert (target.password, target.contact, target.port, target.timeout) == (
        "secret",
        "it@example",
        22,
        30.0,
    )
    assert (target.folder_pattern.text, target.file_pattern.text) == ("{task_id}", "{filename}")


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
