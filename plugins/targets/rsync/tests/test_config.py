"""The rsync target's settings and its error mapping (no server needed).

The settings it shares with every SSH target (``mercure.ssh_settings``) are tested in the
core; here what is the rsync target's own: run_on_complete, chmod, the local programs, and
host and user names that ssh could mistake for options.
"""

from __future__ import annotations

import re

import mercure_target_rsync as plugin
import pytest
from mercure.config import validate_config
from mercure.plugins import build_plugin_manager
from mercure.ssh_settings import SSHFolderTargetConfig
from mercure.targets import PermanentTargetError
from mercure_target_rsync.config import RsyncTargetConfig
from mercure_target_rsync.errors import failure
from pydantic import ValidationError

MERCURE = {"target_type": "rsync", "folder": "/data/in", "user": "mercure", "host": "hpc.example"}


def test_mercure_fields_and_defaults() -> None:
    cfg = RsyncTargetConfig.model_validate(MERCURE)
    assert isinstance(cfg, SSHFolderTargetConfig) and cfg.password is None
    assert cfg.model_dump(include=set(MERCURE)) == MERCURE and cfg.run_on_complete is False
    assert cfg.port == 22 and cfg.timeout == 60 and cfg.chmod == "D770,F660" and cfg.compress
    assert (cfg.rsync_path, cfg.ssh_path) == ("rsync", "ssh")


def test_registered_through_the_entry_point(plugin_manager, register_plugin) -> None:
    register_plugin(plugin, "target_rsync")
    entry = plugin_manager.registry.get("target", "rsync")
    assert entry.implementation is plugin.RsyncTarget and entry.config_model is RsyncTargetConfig


def test_a_mercure_configuration_loads_unchanged() -> None:
    data = {
        "targets": {"hpc": {**MERCURE, "password": "pw", "run_on_complete": True}},
        "rules": {"all": {"rule": "True", "target": "hpc"}},
    }
    config, _ = validate_config(data, build_plugin_manager().registry)
    target = config.targets["hpc"]
    assert isinstance(target, RsyncTargetConfig) and target.run_on_complete


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host": "-oProxyCommand=x"}, "not a plain host or user name"),
        ({"user": "a b"}, "not a plain host or user name"),
        ({"user": "u@h"}, "not a plain host or user name"),
        ({"chmod": "660; rm -rf /"}, "not an rsync --chmod value"),
        ({"timeout": 1}, "greater than or equal to 5"),
        ({"host_key_fingerprint": "MD5:00"}, "not an OpenSSH SHA256 fingerprint"),
        ({"file_pattern": "{SeriesNumber}"}, "must contain {filename} or {SOPInstanceUID}"),
        ({"key_file": "/k", "private_key": "K"}, "not both"),
    ],
)
def test_bad_settings_fail_when_the_configuration_loads(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        RsyncTargetConfig.model_validate({**MERCURE, **change})


@pytest.mark.parametrize(
    ("code", "stderr", "reason", "permanent"),
    [
        (255, "mtest@127.0.0.1: Permission denied (publickey,password).", "login failed", True),
        (255, "Host key verification failed.", "host key is not known", True),
        (255, "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @", "CHANGED", True),
        (255, "ssh: connect to host 127.0.0.1 port 1: Connection refused", "refused", False),
        (
            12,
            "sh: 1: rsync: not found\nrsync: connection unexpectedly closed",
            "not installed",
            True,
        ),
        (
            12,
            "rsync: connection unexpectedly closed (0 bytes received so far)",
            "connection was lost",
            False,
        ),
        (
            23,
            'rsync: [Receiver] mkstemp "/x/.a.dcm.Xy" failed: Permission denied (13)',
            "permission denied",
            True,
        ),
        (
            11,
            'rsync: write failed on "/x/a.dcm": No space left on device (28)',
            "disk is full",
            False,
        ),
        (30, "[sender] io timeout after 60 seconds -- exiting", "timeout", False),
        (1, "rsync: --chmod=x: unknown option", "syntax or usage error", True),
        (20, "", "received SIGUSR1 or SIGINT", False),
    ],
)
def test_exit_codes_and_messages_become_reasons(code, stderr, reason, permanent) -> None:
    error = failure("rsync on u@h:22", code, stderr)
    assert reason in str(error) and f"exit {code}" in str(error)
    assert isinstance(error, PermanentTargetError) is permanent
