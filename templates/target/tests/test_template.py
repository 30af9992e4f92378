"""Tests of the template target: the configuration model, send() on its own, and in a router.

They use the fixtures of ``mercure.testing`` (a pytest plugin installed with mercure-core):
``plugin_manager``, ``register_plugin``, ``synthetic_series`` and the helpers ``config_for``,
``start_router``, ``wait_for`` and ``dcmtk_storescu``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from pathlib import Path

import mercure_target_template as plugin
import pytest
from mercure.config import ConfigError, validate_config
from mercure.jobs.task import Task, TaskInfo
from mercure.plugins import PluginManager
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import config_for, dcmtk_storescu, start_router, wait_for
from mercure_target_template import TemplateTarget, TemplateTargetConfig
from pydantic import ValidationError

SERIES_TAGS = {"PatientID": "MRN0001", "SeriesInstanceUID": "1.2.3.4", "Modality": "CT"}


def make_job(files: list[Path], task_id: str = "task-1") -> DeliveryJob:
    task = Task(info=TaskInfo(action="route", uid=SERIES_TAGS["SeriesInstanceUID"]), id=task_id)
    return DeliveryJob(task_id, files[0].parent, files, SERIES_TAGS, task)


def manifest(folder: Path) -> list[dict[str, object]]:
    path = folder / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_registers_the_template_type(plugin_manager: PluginManager, register_plugin) -> None:
    register_plugin(plugin, "target_template")
    entry = plugin_manager.registry.get("target", "template")
    assert entry.config_model is TemplateTargetConfig
    assert entry.implementation is TemplateTarget


def test_configuration_is_validated_when_it_loads(
    plugin_manager: PluginManager, register_plugin, tmp_path: Path, monkeypatch
) -> None:
    register_plugin(plugin, "target_template")
    monkeypatch.setenv("TEMPLATE_KEY", "s3cret")
    data = {
        "targets": {
            "out": {
                "target_type": "template",
                "folder": str(tmp_path),
                "signing_key": "${env:TEMPLATE_KEY}",
            }
        },
        "rules": {"all": {"rule": "True", "target": "out"}},
    }
    config, _ = validate_config(data, plugin_manager.registry)
    target = config.targets["out"]
    assert isinstance(target, TemplateTargetConfig)
    assert target.signing_key == "s3cret"
    assert str(target.path_pattern) == "{PatientID}/{SeriesInstanceUID}/{filename}"

    data["targets"]["out"]["path_pattern"] = "../{filename}"
    with pytest.raises(ConfigError) as err:
        validate_config(data, plugin_manager.registry)
    assert err.value.errors[0][0] == "targets.out.path_pattern"
    assert "must not contain '.' or '..'" in err.value.errors[0][1]


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("{PatientID}/{SeriesInstanceUID}", "must contain {filename}"),
        ("/abs/{filename}", "must be relative"),
        ("{filename.__class__}", "is not a DICOM keyword"),
        ("{filename!r}", "takes no format options"),
        ("{PatientID:/>9}/{filename}", "takes no format options"),
        ("{filename", "expected '}'"),
    ],
)
def test_bad_patterns_are_rejected(pattern: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        TemplateTargetConfig(folder="/tmp", path_pattern=pattern)


def test_send_copies_by_pattern_and_signs_the_manifest(
    synthetic_series: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = TemplateTargetConfig(
        folder=str(out), path_pattern="{Modality}/{task_id}/{filename}", signing_key="k"
    )
    result = TemplateTarget("out", config).send(make_job(synthetic_series))

    assert sorted(result.delivered) == sorted(f.name for f in synthetic_series)
    assert result.failed == {}
    lines = manifest(out)
    assert len(lines) == len(synthetic_series)
    for src in synthetic_series:
        copy = out / "CT" / "task-1" / src.name
        assert copy.read_bytes() == src.read_bytes()
        line = next(entry for entry in lines if entry["sop_instance_uid"] == src.stem)
        assert line["path"] == f"CT/task-1/{src.name}"
        assert line["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert line["hmac_sha256"] == hmac.new(b"k", src.read_bytes(), "sha256").hexdigest()


def test_a_sender_cannot_steer_files_out_of_the_folder(
    synthetic_series: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = make_job(synthetic_series[:1])
    job = DeliveryJob(job.task_id, job.folder, job.files, {"PatientID": "../../etc"}, job.task)
    target = TemplateTarget("out", TemplateTargetConfig(folder=str(out)))
    assert target.send(job).delivered == [synthetic_series[0].name]
    written = [p for p in out.rglob("*.dcm")]
    assert len(written) == 1
    assert written[0].is_relative_to(out)
    assert written[0].relative_to(out).parts[:2] == ("_.._etc", "UNKNOWN")  # no SeriesInstanceUID


def test_results_are_per_file(synthetic_series: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    gone = synthetic_series[3]
    gone.unlink()
    result = TemplateTarget("out", TemplateTargetConfig(folder=str(out))).send(
        make_job(synthetic_series)
    )
    assert gone.name not in result.delivered
    assert len(result.delivered) == len(synthetic_series) - 1
    assert "No such file" in result.failed[gone.name]
    assert {entry["sop_instance_uid"] for entry in manifest(out)} == {
        f.stem for f in synthetic_series if f != gone
    }


def test_missing_folder_fails_the_whole_job(synthetic_series: list[Path], tmp_path: Path) -> None:
    target = TemplateTarget("out", TemplateTargetConfig(folder=str(tmp_path / "absent")))
    with pytest.raises(TargetError, match="does not exist"):
        target.send(make_job(synthetic_series))
    with pytest.raises(TargetError, match="does not exist"):
        target.test_connection()


def test_connection_reports_the_manifest(tmp_path: Path) -> None:
    target = TemplateTarget("out", TemplateTargetConfig(folder=str(tmp_path), signing_key="k"))
    assert target.test_connection() == (
        f"folder {tmp_path} is writable; HMAC-signed manifest {tmp_path / 'manifest.jsonl'}"
    )


@pytest.mark.peer
def test_router_delivers_a_series_sent_with_dcmtk(
    synthetic_series: list[Path], tmp_path: Path
) -> None:
    """The whole path: DCMTK storescu -> receiver -> router -> dispatcher -> template target."""
    out = tmp_path / "out"
    out.mkdir()
    config = config_for(
        tmp_path,
        targets={"out": {"target_type": "template", "folder": str(out)}},
        rules={"ct": {"rule": "tags.Modality == 'CT'", "target": "out"}},
    )
    with contextlib.contextmanager(start_router)(config) as router:
        dcmtk_storescu(synthetic_series, router.port)
        wait_for(lambda: len(manifest(out)) == len(synthetic_series), timeout=30, what="manifest")
    assert {entry["sop_instance_uid"] for entry in manifest(out)} == {
        f.stem for f in synthetic_series
    }
