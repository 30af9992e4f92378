"""mercure's dicomweb target entries load unchanged; wrong settings are reported with their path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mercure.config import ConfigError, validate_config
from mercure.plugins import build_plugin_manager
from mercure_target_dicomweb import DicomWebTarget, DicomWebTargetConfig
from pydantic import ValidationError


def _validate(targets: dict[str, object]) -> object:
    config, _ = validate_config({"targets": targets}, build_plugin_manager().registry)
    return config


def test_the_plugin_registers_type_dicomweb() -> None:
    entry = build_plugin_manager().registry.get("target", "dicomweb")
    assert entry.implementation is DicomWebTarget
    assert entry.config_model is DicomWebTargetConfig
    assert entry.distribution == "mercure-target-dicomweb"
    assert DicomWebTarget.streaming is True


def test_mercure_entries_load_unchanged_with_mercure_defaults() -> None:
    # As mercure's web interface writes them: empty prefixes and credentials are null.
    config = _validate(
        {
            "pacs": {
                "target_type": "dicomweb",
                "url": "https://pacs.example.org/dicom-web/",
                "qido_url_prefix": None,
                "wado_url_prefix": None,
                "stow_url_prefix": None,
                "access_token": None,
                "http_user": "router",
                "http_password": "secret",
                "contact": "",
                "comment": "archive",
            },
            "cloud": {
                "target_type": "dicomweb",
                "url": "https://healthcare.example.com/v1/dicomWeb",
                "access_token": "tok",
                "qido_url_prefix": "qido",
                "stow_url_prefix": "/stow/",
            },
        }
    )
    pacs = config.targets["pacs"]  # type: ignore[attr-defined]
    assert isinstance(pacs, DicomWebTargetConfig)
    assert pacs.url == "https://pacs.example.org/dicom-web"
    assert pacs.stow_url == "https://pacs.example.org/dicom-web/studies"
    assert pacs.auth_kind == "basic"
    cloud = config.targets["cloud"]  # type: ignore[attr-defined]
    assert cloud.stow_url == "https://healthcare.example.com/v1/dicomWeb/stow/studies"
    assert cloud.qido_base == "https://healthcare.example.com/v1/dicomWeb/qido"
    assert cloud.wado_base == "https://healthcare.example.com/v1/dicomWeb"
    assert cloud.auth_kind == "bearer"


def test_mercure_fields_and_their_defaults() -> None:
    cfg = DicomWebTargetConfig(url="http://h/dicom-web")
    fields = DicomWebTargetConfig.model_fields
    for name in ("qido_url_prefix", "wado_url_prefix", "stow_url_prefix", "access_token"):
        assert fields[name].default is None
    assert fields["http_user"].default is None and fields["http_password"].default is None
    assert fields["url"].is_required()
    assert cfg.target_type == "dicomweb" and cfg.contact == "" and cfg.comment == ""
    # The settings this plugin adds all have defaults.
    assert cfg.batch_max_instances == 50 and cfg.batch_max_bytes == 64 * 1024 * 1024
    assert cfg.verify_tls is True and cfg.ca_bundle is None and cfg.client_cert is None
    assert cfg.auth_kind == "none"


def test_basic_authentication_wins_over_a_token_as_in_mercure() -> None:
    cfg = DicomWebTargetConfig(url="http://h", http_user="u", http_password="p", access_token="t")
    assert cfg.auth_kind == "basic"


def test_secrets_may_be_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DICOMWEB_PASSWORD", "from-env")
    token = tmp_path / "token"
    token.write_text("from-file\n")
    cfg = DicomWebTargetConfig(
        url="http://h", http_user="u", http_password="${env:DICOMWEB_PASSWORD}"
    )
    assert cfg.http_password == "from-env"
    assert DicomWebTargetConfig(url="http://h", access_token=f"${{file:{token}}}").access_token == (
        "from-file"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "file:///data/dicomweb"}, "file:// DICOMweb targets"),
        ({"url": "pacs.example.org/dicom-web"}, "http:// or https:// URL"),
        ({"url": "http://h", "http_user": "u"}, "http_password is empty"),
        ({"url": "http://h", "http_password": "p"}, "http_user is empty"),
        ({"url": "http://h", "batch_max_instances": 0}, "greater than or equal to 1"),
        ({"url": "http://h", "ca_bundle": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"url": "http://h", "batch_size": 10}, "Extra inputs are not permitted"),
    ],
)
def test_wrong_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DicomWebTargetConfig(**settings)  # type: ignore[arg-type]


def test_config_check_reports_a_wrong_setting_with_its_json_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _validate({"web": {"target_type": "dicomweb", "url": "http://h", "batch_max_instance": 5}})
    paths = [path for path, _ in caught.value.errors]
    assert paths == ["targets.web.batch_max_instance"]

    path = tmp_path / "mercure.json"
    path.write_text(json.dumps({"targets": {"web": {"target_type": "dicomweb", "url": "ftp://h"}}}))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mercure.cli import main; main()",
            "config",
            "check",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "targets.web.url" in run.stdout + run.stderr
    assert "http:// or https:// URL" in run.stdout + run.stderr
