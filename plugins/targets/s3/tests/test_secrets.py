"""No secret key in logs, task files, error messages, uploaded objects or the process list."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mercure.targets import TargetError
from mercure.testing import make_series

if TYPE_CHECKING:
    from conftest import SeaweedS3
    from mercure.testing import DispatchEnv

pytestmark = pytest.mark.peer


def _spool_text(root: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix != ".dcm"
    )


def test_secrets_stay_out_of_logs_and_task_files(
    s3_server: SeaweedS3,
    bucket: str,
    dispatch_env: DispatchEnv,
    tmp_path: Path,
    make_target: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = s3_server.admin.secret_key
    wrong = "wrong-secret-Zk41m8"
    monkeypatch.setenv("S3_TEST_SECRET", secret)
    monkeypatch.setenv("S3_WRONG_SECRET", wrong)
    caplog.set_level(logging.DEBUG)  # botocore's request logs too
    good = s3_server.settings(bucket, secret_access_key="${env:S3_TEST_SECRET}", manifest=True)
    bad = s3_server.settings(bucket, secret_access_key="${env:S3_WRONG_SECRET}")
    env = dispatch_env.start({"good": good, "bad": bad})
    delivered = env.job(make_series(tmp_path / "a", 4), "good")
    refused = env.job(make_series(tmp_path / "b", 4), "bad")
    assert env.deliver(delivered)[0].state == "success"
    where, task = env.deliver(refused)
    assert where.state == "error" and "SignatureDoesNotMatch" in str(task.error)
    with pytest.raises(TargetError):
        make_target(bad).test_connection()
    make_target(good).test_connection()

    commands = []  # every process's command line on this machine, the store's included
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            commands.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    out = capsys.readouterr()
    seen = {
        "logs": caplog.text,
        "stdout": out.out,
        "stderr": out.err,
        "spool": _spool_text(tmp_path / "spool"),
        "error": str(task.error),
        "the process list": "\n".join(commands),
    }
    client = s3_server.client()
    for key in s3_server.keys(bucket):
        head = client.head_object(Bucket=bucket, Key=key)
        seen[key] = str(head.get("Metadata")) + (
            s3_server.body(bucket, key).decode("latin-1") if key.endswith(".json") else ""
        )
    assert "task.json" in " ".join(str(p) for p in (tmp_path / "spool").rglob("task.json"))
    assert any(r.name.startswith("botocore") for r in caplog.records)  # requests were logged
    for where_, text in seen.items():
        assert secret not in text, f"the secret key appears in {where_}"
        assert wrong not in text, f"the (wrong) secret key appears in {where_}"
