"""The plugin template, installed in the workspace, works as a real plugin would.

It is found through its ``mercure`` entry point (``mercure plugins`` lists it, the two
environment variables that control autoloading are honoured), a configuration file using its
``template`` target passes ``mercure config check`` and ``mercure targets test``, and a router
delivers a series sent over DICOM to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
from mercure.testing import config_for, start_router, wait_for
from pydicom import dcmread
from pynetdicom import AE

DIST = "mercure-target-template"


@pytest.fixture(scope="module")
def mercure_cli() -> str:
    """The ``mercure`` console script of this environment (the plugin must be installed)."""
    try:
        distribution(DIST)
    except PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: run `python3 dev.py setup` (uv sync --all-packages)")
    exe = shutil.which("mercure", path=str(Path(sys.executable).parent))
    assert exe, f"no mercure command beside {sys.executable}"
    return exe


def cli(exe: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MERCURE_")}
    return subprocess.run(
        [exe, *args], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )


def listed(exe: str, **env: str) -> dict[str, dict[str, Any]]:
    done = cli(exe, "plugins", "--json", **env)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)}


def test_mercure_plugins_lists_the_template(mercure_cli: str) -> None:
    plugins = listed(mercure_cli)
    row = plugins["target_template"]
    assert row["distribution"] == DIST
    assert row["source"] == "entry point"
    assert row["version"] == distribution(DIST).version
    assert row["types"] == ["target:template"]
    assert "target:folder" in plugins["builtin_folder_target"]["types"]


def test_autoload_variables(mercure_cli: str) -> None:
    only = listed(mercure_cli, MERCURE_PLUGINS=DIST)
    assert {r["source"] for r in only.values()} == {"entry point", "built-in"}
    assert [n for n, r in only.items() if r["source"] == "entry point"] == ["target_template"]

    none = listed(mercure_cli, MERCURE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert "target_template" not in none
    assert {r["source"] for r in none.values()} == {"built-in"}


def test_config_check_and_targets_test(mercure_cli: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = {
        "incoming_folder": str(tmp_path / "incoming"),
        "outgoing_folder": str(tmp_path / "outgoing"),
        "success_folder": str(tmp_path / "success"),
        "error_folder": str(tmp_path / "error"),
        "discard_folder": str(tmp_path / "discard"),
        "processing_folder": str(tmp_path / "processing"),
        "studies_folder": str(tmp_path / "studies"),
        "targets": {
            "archive": {
                "target_type": "template",
                "folder": str(out),
                "signing_key": "${env:ARCHIVE_KEY}",
            }
        },
        "rules": {"all": {"rule": "True", "target": "archive"}},
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(config))

    checked = cli(mercure_cli, "config", "check", str(path), ARCHIVE_KEY="k")
    assert checked.returncode == 0, checked.stderr
    assert "valid (1 targets, 1 rules, 0 modules)" in checked.stdout

    unset = cli(mercure_cli, "config", "check", str(path))
    assert unset.returncode == 1
    assert "targets.archive.signing_key" in unset.stderr
    assert "ARCHIVE_KEY is not set" in unset.stderr

    tested = cli(mercure_cli, "targets", "test", "archive", "--config", str(path), ARCHIVE_KEY="k")
    assert tested.returncode == 0, tested.stderr
    assert tested.stdout.strip() == (
        f"archive: OK: folder {out} is writable; HMAC-signed manifest {out / 'manifest.jsonl'}"
    )


def test_router_delivers_to_the_template_target(
    synthetic_series: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = config_for(
        tmp_path,
        targets={"archive": {"target_type": "template", "folder": str(out)}},
        rules={"all": {"rule": "True", "target": "archive"}},
    )
    manifest = out / "manifest.jsonl"
    with contextlib.contextmanager(start_router)(config) as router:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(dcmread(synthetic_series[0]).SOPClassUID)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="MERCURE")
        assert assoc.is_established
        try:
            for path in synthetic_series:
                status = assoc.send_c_store(dcmread(path))
                assert status.Status == 0x0000
        finally:
            assoc.release()
        success = config.folder("success")
        wait_for(lambda: any(success.iterdir()), timeout=30, what="a job in success/")

    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(line["sop_instance_uid"] for line in lines) == sorted(
        p.stem for p in synthetic_series
    )
    (job,) = success.iterdir()
    for line in lines:
        assert line["task_id"] == job.name
        copied = out / line["path"]
        assert copied.parts[-3:-1] == ("MRN0001", dcmread(copied).SeriesInstanceUID)
        assert copied.read_bytes() == (job / copied.name).read_bytes()
