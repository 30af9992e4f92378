"""The installed plugin as an operator meets it: ``mercure plugins``, ``config check``,
``targets test`` (against the real store), credentials from the environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.testing import make_series

if TYPE_CHECKING:
    from conftest import SeaweedS3

DIST = "mercure-target-s3"


@pytest.fixture(scope="module")
def mercure_cli() -> str:
    exe = shutil.which("mercure", path=str(Path(sys.executable).parent))
    assert exe, f"no mercure command beside {sys.executable}"
    return exe


def cli(exe: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MERCURE_", "AWS_"))}
    return subprocess.run(
        [exe, *args], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_mercure_plugins_lists_it(mercure_cli: str) -> None:
    done = cli(mercure_cli, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    row = rows["target_s3"]
    assert row["distribution"] == DIST
    assert row["version"] == distribution(DIST).version
    assert row["types"] == ["target:s3"]


@pytest.mark.peer
def test_config_check_and_targets_test(
    mercure_cli: str, s3_server: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    settings = s3_server.settings(bucket, secret_access_key="${env:S3_SECRET}")
    config: dict[str, Any] = {
        **{f"{n}_folder": str(tmp_path / n) for n in ("incoming", "outgoing", "success")},
        **{f"{n}_folder": str(tmp_path / n) for n in ("error", "discard", "processing")},
        "studies_folder": str(tmp_path / "studies"),
        "targets": {
            "research": settings,
            "missing": s3_server.settings("no-such-bucket-x"),
        },
        "rules": {"all": {"rule": "True", "target": "research"}},
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(config))
    secret = s3_server.admin.secret_key

    checked = cli(mercure_cli, "config", "check", str(path), S3_SECRET=secret)
    assert checked.returncode == 0, checked.stderr
    unset = cli(mercure_cli, "config", "check", str(path))
    assert unset.returncode == 1
    assert "targets.research.secret_access_key" in unset.stderr
    assert "S3_SECRET is not set" in unset.stderr

    tested = cli(
        mercure_cli, "targets", "test", "research", "--config", str(path), S3_SECRET=secret
    )
    assert tested.returncode == 0, tested.stderr
    assert f"research: OK: bucket {bucket} at {s3_server.endpoint} answers" in tested.stdout
    missing = cli(
        mercure_cli, "targets", "test", "missing", "--config", str(path), S3_SECRET=secret
    )
    assert missing.returncode != 0
    assert "bucket no-such-bucket-x does not exist" in missing.stdout + missing.stderr
    assert secret not in tested.stdout + tested.stderr + missing.stdout + missing.stderr


@pytest.mark.peer
def test_empty_credentials_come_from_boto3s_chain(
    s3_server: SeaweedS3,
    bucket: str,
    make_target: Any,
    job_for: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.admin.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.admin.secret_key)
    files = make_series(tmp_path / "series", 3)
    target = make_target(s3_server.settings(bucket, access_key_id="", secret_access_key=""))
    assert "credentials from boto3's chain accepted" in target.test_connection()
    result = target.send(job_for(files, task_id="chain"))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert len(s3_server.keys(bucket, "mercure/chain/")) == 3
