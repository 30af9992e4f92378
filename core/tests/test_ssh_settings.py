"""Settings of an SSH folder target: mercure's fields load unchanged, bad values fail at load."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from mercure.ssh_settings import SSHFolderTargetConfig, check_fingerprint
from pydantic import ValidationError


class DemoConfig(SSHFolderTargetConfig):
    target_type: Literal["demo"] = "demo"


MERCURE = {"target_type": "demo", "folder": "/data/in", "user": "mercure", "host": "sftp.example"}
PIN = "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8"


def test_mercure_fields_and_defaults() -> None:
    cfg = DemoConfig.model_validate(MERCURE)
    assert cfg.model_dump(exclude={"folder_pattern", "file_pattern"}) == {
        "contact": "",
        "comment": "",
        "direction": "push",
        "target_type": "demo",
        "folder": "/data/in",
        "user": "mercure",
        "host": "sftp.example",
        "password": None,
        "port": 22,
        "key_file": None,
        "private_key": None,
        "key_passphrase": None,
        "known_hosts": None,
        "host_key_fingerprint": None,
        "trust_on_first_use": False,
    }
    assert cfg.folder_pattern.text == "{task_id}" and cfg.file_pattern.text == "{filename}"


def test_secrets_from_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEMO_PW", "from-env")
    (tmp_path / "pp").write_text("from-file\n")
    (tmp_path / "key").write_text("KEY\n")
    cfg = DemoConfig.model_validate(
        {
            **MERCURE,
            "password": "${env:DEMO_PW}",
            "private_key": f"${{file:{tmp_path / 'key'}}}",
            "key_passphrase": f"${{file:{tmp_path / 'pp'}}}",
        }
    )
    assert (cfg.password, cfg.private_key, cfg.key_passphrase) == ("from-env", "KEY", "from-file")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"host_key_fingerprint": "ab:cd"}, "not an OpenSSH SHA256 fingerprint"),
        ({"host_key_fingerprint": "MD5:00"}, "ssh-keyscan -p PORT HOST | ssh-keygen -lf -"),
        ({"file_pattern": "{SeriesNumber}.dcm"}, "must contain {filename} or {SOPInstanceUID}"),
        ({"file_pattern": "x/.h{filename}"}, "hidden"),
        ({"folder_pattern": "{SeriesInstanceUID}/{SOPInstanceUID}"}, "differs between"),
        ({"folder_pattern": "{filename}"}, "differs between the instances"),
        ({"folder_pattern": "{NoSuchKeyword}"}, "not a DICOM keyword"),
        ({"folder_pattern": "../{task_id}"}, "'.' or '..'"),
        ({"key_file": "/k", "private_key": "KEY"}, "set key_file or private_key, not both"),
        ({"key_passphrase": "pp"}, "no key_file or private_key"),
        ({"host_key_fingerprint": PIN, "trust_on_first_use": True}, "cannot be combined"),
        ({"port": 0}, "greater than or equal to 1"),
        ({"port": 65536}, "less than or equal to 65535"),
        ({"host": ""}, "at least 1 character"),
        ({"user": ""}, "at least 1 character"),
        ({"folder": ""}, "at least 1 character"),
        ({"hostname": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_fail_when_the_configuration_loads(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        DemoConfig.model_validate({**MERCURE, **change})


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (PIN, PIN),
        (f"  {PIN}=\n", PIN),  # as some tools print it, padded
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_fingerprint_is_kept_as_ssh_prints_it(value: str | None, kept: str | None) -> None:
    assert check_fingerprint(value) == kept
    assert (
        DemoConfig.model_validate({**MERCURE, "host_key_fingerprint": value}).host_key_fingerprint
        == kept
    )


def test_a_key_with_its_passphrase_is_consistent() -> None:
    cfg = DemoConfig.model_validate({**MERCURE, "key_file": "/k", "key_passphrase": "pp"})
    assert cfg.key_file == "/k" and cfg.key_passphrase == "pp"


def test_the_settings_and_the_layout_need_no_ssh_library() -> None:
    """The core stays free of paramiko: a plugin brings the SSH client it uses."""
    code = (
        "import sys, mercure.ssh_settings, mercure.remote_layout; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paramiko', 'asyncssh')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
