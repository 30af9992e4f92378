"""The ``s3`` configuration: mercure's fields load unchanged, bad values fail at load time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError
from mercure.testing import config_for
from mercure_target_s3 import S3Target, S3TargetConfig
from pydantic import ValidationError

MERCURE = {
    "target_type": "s3",
    "contact": "",
    "comment": "research bucket",
    "region": "eu-central-1",
    "bucket": "research",
    "prefix": "mercure/ct",
    "access_key_id": "AKIAEXAMPLE",
    "secret_access_key": "secret-example",
}


def test_registered(plugin_manager: Any, register_plugin: Any) -> None:
    import mercure_target_s3 as plugin

    register_plugin(plugin, "target_s3")
    entry = plugin_manager.registry.get("target", "s3")
    assert entry.implementation is S3Target
    assert entry.config_model is S3TargetConfig


def test_a_mercure_s3_target_loads_unchanged(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        targets={"bucket": MERCURE},
        rules={"all": {"rule": "True", "target": "bucket"}},
    )
    target = config.targets["bucket"]
    assert isinstance(target, S3TargetConfig)
    assert (target.region, target.bucket) == ("eu-central-1", "research")
    assert target.prefix == "mercure/ct"
    assert (target.access_key_id, target.secret_access_key) == ("AKIAEXAMPLE", "secret-example")
    # What this plugin adds keeps mercure's behaviour by default.
    assert target.key_pattern.text == "{task_id}/{filename}"
    assert target.endpoint_url is None
    assert target.manifest is False
    assert target.skip_existing is True
    assert target.checksum == "SHA256"
    assert target.parallel_uploads == 8
    assert target.multipart_threshold == target.multipart_chunksize == 16 * 1024 * 1024
    assert target.object_key("t1/x.dcm") == "mercure/ct/t1/x.dcm"
    dumped = target.model_dump(mode="json")
    assert dumped["key_pattern"] == "{task_id}/{filename}"
    assert S3TargetConfig.model_validate(dumped) == target


def test_a_target_without_target_type_is_s3_when_it_fits(tmp_path: Path) -> None:
    """mercure gives an untyped target the first type whose fields it fits."""
    untyped = {k: v for k, v in MERCURE.items() if k != "target_type"}
    config = config_for(
        tmp_path,
        targets={"bucket": untyped},
        rules={"all": {"rule": "True", "target": "bucket"}},
    )
    assert isinstance(config.targets["bucket"], S3TargetConfig)


@pytest.mark.parametrize(
    "field", ["region", "bucket", "prefix", "access_key_id", "secret_access_key"]
)
def test_mercures_fields_are_required(field: str) -> None:
    data = {k: v for k, v in MERCURE.items() if k != field}
    with pytest.raises(ValidationError, match=field):
        S3TargetConfig.model_validate(data)


@pytest.mark.parametrize(
    ("prefix", "key"),
    [("", "t/x.dcm"), ("a/b/", "a/b/t/x.dcm"), ("/a//b", "a/b/t/x.dcm"), ("a", "a/t/x.dcm")],
)
def test_prefix_joins_like_a_path(prefix: str, key: str) -> None:
    cfg = S3TargetConfig.model_validate({**MERCURE, "prefix": prefix})
    assert cfg.object_key("t/x.dcm") == key


def test_secret_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S3_KEY_ID", "AKIAFROMENV")
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    cfg = S3TargetConfig.model_validate(
        {**MERCURE, "access_key_id": "${env:S3_KEY_ID}", "secret_access_key": f"${{file:{secret}}}"}
    )
    assert (cfg.access_key_id, cfg.secret_access_key) == ("AKIAFROMENV", "from-a-file")
    monkeypatch.delenv("S3_KEY_ID")
    with pytest.raises(ValidationError, match="S3_KEY_ID is not set"):
        S3TargetConfig.model_validate({**MERCURE, "access_key_id": "${env:S3_KEY_ID}"})


def test_empty_credentials_use_boto3s_chain() -> None:
    cfg = S3TargetConfig.model_validate({**MERCURE, "access_key_id": "", "secret_access_key": ""})
    assert cfg.uses_chain


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secret_access_key": ""}, "give both access_key_id and secret_access_key"),
        ({"access_key_id": ""}, "give both access_key_id and secret_access_key"),
        ({"key_pattern": "{task_id}/{SeriesInstanceUID}"}, "must contain {filename}"),
        ({"key_pattern": "{task_id}/{SeriesInstanceUId}/{filename}"}, "is not a DICOM keyword"),
        ({"key_pattern": "/abs/{filename}"}, "must be relative"),
        ({"manifest_key": "{task_id}/{filename}.json"}, "cannot use {filename}"),
        ({"endpoint_url": "s3.example.org"}, "must be an http:// or https:// URL"),
        ({"bucket": "bucket/folder"}, "put folders into 'prefix'"),
        ({"bucket": " "}, "bucket must name the bucket"),
        ({"prefix": "a/../b"}, "must not contain '.' or '..'"),
        ({"multipart_chunksize": 1024}, "greater than or equal to 5242880"),
        ({"parallel_uploads": 0}, "greater than or equal to 1"),
        ({"checksum": "CRC64"}, "'SHA256' or 'MD5'"),
        ({"session_token": "x", "access_key_id": "", "secret_access_key": ""}, "session_token"),
        ({"unknown_setting": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_fail_when_the_configuration_loads(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("(", r"\(")):
        S3TargetConfig.model_validate({**MERCURE, **change})


def test_bad_settings_are_reported_with_their_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config_for(
            tmp_path,
            targets={"bucket": {**MERCURE, "key_pattern": "{task_id}"}},
            rules={"all": {"rule": "True", "target": "bucket"}},
        )
    assert "targets.bucket" in str(caught.value)
    assert "key_pattern" in str(caught.value)


def test_settings_accept_other_spellings() -> None:
    cfg = S3TargetConfig.model_validate(
        {**MERCURE, "checksum": "md5", "endpoint_url": " ", "region": " us-east-1 "}
    )
    assert (cfg.checksum, cfg.endpoint_url, cfg.region) == ("MD5", None, "us-east-1")
