"""mercure's target entries load unchanged; the plugin is listed and its types are registered."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError, ReceiverTLSConfig, validate_config
from mercure.plugins import build_plugin_manager
from mercure_target_dicom import DicomTarget, DicomTargetConfig, DicomTLSTarget
from mercure_target_dicom.config import DicomTLSTargetConfig
from pydantic import ValidationError


def mercure_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``mercure`` command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-c", "from mercure.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _validate(targets: dict[str, object]) -> object:
    registry = build_plugin_manager().registry
    config, _ = validate_config({"targets": targets}, registry)
    return config


def test_mercure_dicom_target_entries_load_unchanged() -> None:
    # Entries as mercure's web interface writes them: port a string, empty contact.
    config = _validate(
        {
            "pacs": {
                "target_type": "dicom",
                "ip": "10.0.0.5",
                "port": "104",
                "aet_target": "PACS",
                "aet_source": "MERCURE",
                "contact": "",
                "comment": "main archive",
            },
            "secure": {
                "target_type": "dicomtls",
                "ip": "10.0.0.6",
                "port": "2762",
                "aet_target": "SECURE",
                "aet_source": "",
                "tls_key": "/etc/m/key.pem",
                "tls_cert": "/etc/m/cert.pem",
                "ca_cert": "/etc/m/ca.pem",
            },
            # mercure's oldest configurations have DICOM targets without a type.
            "legacy": {"ip": "10.0.0.7", "port": "11112", "aet_target": "OLD"},
        }
    )
    targets = config.targets  # type: ignore[attr-defined]
    assert isinstance(targets["pacs"], DicomTargetConfig)
    assert targets["pacs"].port_number == 104
    assert targets["pacs"].timeout == 60
    assert targets["pacs"].pass_sender_aet is False
    assert isinstance(targets["secure"], DicomTLSTargetConfig)
    assert targets["secure"].tls_check_hostname is False
    assert targets["legacy"].target_type == "dicom"
    # Serialised back, mercure's fields keep their names and the port stays a string.
    dumped = json.loads(targets["pacs"].model_dump_json())
    assert dumped["port"] == "104" and dumped["aet_target"] == "PACS"


def test_port_as_int_and_empty_port() -> None:
    assert DicomTargetConfig(ip="h", port=11112, aet_target="A").port == "11112"
    assert DicomTargetConfig(ip="h", port="", aet_target="A").port_number == 104


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1"])
def test_invalid_port_is_reported_with_its_path(port: str) -> None:
    with pytest.raises(ConfigError) as info:
        _validate({"pacs": {"target_type": "dicom", "ip": "h", "port": port, "aet_target": "A"}})
    assert any(path == "targets.pacs.port" for path, _ in info.value.errors)
    assert "between 1 and 65535" in str(info.value)


def test_unknown_field_and_long_ae_title_are_errors() -> None:
    with pytest.raises(ConfigError) as info:
        _validate(
            {
                "pacs": {
                    "target_type": "dicom",
                    "ip": "h",
                    "port": "104",
                    "aet_target": "A",
                    "aet_sorce": "TYPO",
                }
            }
        )
    assert any(path == "targets.pacs.aet_sorce" for path, _ in info.value.errors)
    with pytest.raises(ValidationError, match="at most 16 characters"):
        DicomTargetConfig(ip="h", aet_target="A" * 17)


def test_types_are_registered_by_the_plugin() -> None:
    manager = build_plugin_manager()
    dicom = manager.registry.get("target", "dicom")
    tls = manager.registry.get("target", "dicomtls")
    assert dicom.implementation is DicomTarget and dicom.distribution == "mercure-target-dicom"
    assert tls.implementation is DicomTLSTarget
    assert tls.config_model is DicomTLSTargetConfig


def test_mercure_plugins_lists_distribution_and_version() -> None:
    from importlib.metadata import version

    result = mercure_cli("plugins")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("target_dicom"))
    assert f"mercure-target-dicom {version('mercure-target-dicom')}" in line
    assert "entry point" in line
    assert "target:dicom, target:dicomtls" in line

    rows = json.loads(mercure_cli("plugins", "--json").stdout)
    row = next(r for r in rows if r["name"] == "target_dicom")
    assert row["distribution"] == "mercure-target-dicom"
    assert row["types"] == ["target:dicom", "target:dicomtls"]


def test_receiver_tls_requiring_client_certs_needs_a_ca() -> None:
    with pytest.raises(ValidationError, match="require_client_cert needs ca_cert"):
        ReceiverTLSConfig(key="k.pem", cert="c.pem")
    relaxed = ReceiverTLSConfig(key="k.pem", cert="c.pem", require_client_cert=False)
    assert relaxed.ca_cert == ""


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    from mercure.targets import TargetError

    cfg = DicomTLSTargetConfig(
        ip="127.0.0.1",
        port="2762",
        aet_target="A",
        tls_key=str(tmp_path / "nope.key"),
        tls_cert=str(tmp_path / "nope.crt"),
        ca_cert=str(tmp_path / "ca.crt"),
    )
    with pytest.raises(TargetError, match=r"tls_key file .*nope\.key does not exist"):
        DicomTLSTarget("secure", cfg).test_connection()
    only_cert = cfg.model_copy(update={"tls_key": ""})
    with pytest.raises(TargetError, match="set both tls_key and tls_cert"):
        DicomTLSTarget("secure", only_cert).test_connection()


def _tls_config(**fields: str) -> DicomTLSTargetConfig:
    return DicomTLSTargetConfig(ip="127.0.0.1", port="2762", aet_target="A", **fields)


def test_tls_file_problems_are_explained(
    tmp_path: Path, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives import serialization
    from mercure.targets import TargetError
    from mercure_target_dicom.tls import client_context

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TargetError, match=r"ca_cert .*garbage\.pem cannot be used"):
        client_context("secure", _tls_config(ca_cert=str(garbage)))

    with pytest.raises(TargetError, match="tls_key is not the key of tls_cert"):
        client_context(
            "secure",
            _tls_config(
                tls_key=str(certs.other_cli_key), tls_cert=str(certs.cli_crt), ca_cert=str(certs.ca)
            ),
        )

    key = serialization.load_pem_private_key(certs.cli_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    locked = _tls_config(tls_key=str(encrypted), tls_cert=str(certs.cli_crt), ca_cert=str(certs.ca))
    with pytest.raises(TargetError, match="tls_key is encrypted: set tls_key_password"):
        client_context("secure", locked)
    # The password may be given as a reference to an environment variable.
    monkeypatch.setenv("MERCURE_TEST_KEY_PASSWORD", "s3cret")
    unlocked = DicomTLSTargetConfig.model_validate(
        {**locked.model_dump(), "tls_key_password": "${env:MERCURE_TEST_KEY_PASSWORD}"}
    )
    assert unlocked.tls_key_password == "s3cret"
    assert client_context("secure", unlocked).verify_mode == ssl.CERT_REQUIRED
