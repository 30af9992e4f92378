"""The sftp target's settings: mercure's fields load unchanged, bad values fail at load time."""

from __future__ import annotations

import re
from pathlib import Path

import mercure_target_sftp as plugin
import pytest
from mercure.config import validate_config
from mercure.plugins import build_plugin_manager
from mercure_target_sftp.config import SftpTargetConfig
from pydantic import ValidationError

MERCURE = {"target_type": "sftp", "folder": "/data/in", "user": "mercure", "host": "sftp.example"}


def test_mercure_fields_and_defaults() -> None:
    cfg = SftpTargetConfig.model_validate(MERCURE)
    assert (cfg.folder, cfg.user, cfg.host, cfg.password) == (
        "/data/in",
        "mercure",
        "sftp.example",
        None,
    )
    assert cfg.port == 22
    assert cfg.folder_pattern.text == "{task_id}" and cfg.file_pattern.text == "{filename}"
    assert cfg.known_hosts is None and cfg.host_key_fingerprint is None
    assert cfg.trust_on_first_use is False
    assert cfg.contact == "" and cfg.comment == ""


def test_registered_through_the_entry_point(plugin_manager, register_plugin) -> None:
    register_plugin(plugin, "target_sftp")
    entry = plugin_manager.registry.get("target", "sftp")
    assert entry.implementation is plugin.SftpTarget and entry.config_model is SftpTargetConfig


def test_a_mercure_configuration_loads_unchanged(tmp_path: Path) -> None:
    registry = build_plugin_manager().registry
    data = {
        "targets": {"cluster": {**MERCURE, "password": "secret", "contact": "it@example"}},
        "rules": {"all": {"rule": "True", "target": "cluster"}},
    }
    config, _warnings = validate_config(data, registry)
    target = config.targets["cluster"]
    assert isinstance(target, SftpTargetConfig) and target.password == "secret"


def test_password_from_a_secret_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SFTP_PW", "from-env")
    (tmp_path / "pp").write_text("from-file\n")
    cfg = SftpTargetConfig.model_validate(
        {
            **MERCURE,
            "password": "${env:SFTP_PW}",
            "private_key": "KEY",
            "key_passphrase": f"${{file:{tmp_path / 'pp'}}}",
        }
    )
    assert cfg.password == "from-env" and cfg.key_passphrase == "from-file"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host_key_fingerprint": "ab:cd"}, "not an OpenSSH SHA256 fingerprint"),
        ({"file_pattern": "{SeriesNumber}.dcm"}, "must contain {filename} or {SOPInstanceUID}"),
        ({"file_pattern": "x/.h{filename}"}, "hidden"),
        (
            {"folder_pattern": "{SeriesInstanceUID}/{SOPInstanceUID}"},
            "differs between the instances",
        ),
        ({"folder_pattern": "{NoSuchKeyword}"}, "not a DICOM keyword"),
        ({"folder_pattern": "../{task_id}"}, "'.' or '..'"),
        ({"key_file": "/k", "private_key": "KEY"}, "not both"),
        ({"key_passphrase": "pp"}, "no key_file or private_key"),
        (
            {"host_key_fingerprint": "SHA256:" + "A" * 43, "trust_on_first_use": True},
            "cannot be combined",
        ),
        ({"port": 0}, "greater than or equal to 1"),
        ({"host": ""}, "at least 1 character"),
        ({"hostname": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_fail_when_the_configuration_loads(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        SftpTargetConfig.model_validate({**MERCURE, **change})


def test_fingerprint_is_kept_as_ssh_prints_it() -> None:
    pin = "SHA256:" + "x" * 42 + "A"
    assert (
        SftpTargetConfig.model_validate(
            {**MERCURE, "host_key_fingerprint": pin + "="}
        ).host_key_fingerprint
        == pin
    )
