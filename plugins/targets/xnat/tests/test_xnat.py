"""The XNAT target against the XNAT stand-in: the zip as sent, sessions, failures, retries."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
from mercure.config import ConfigError, validate_config
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.plugins import build_plugin_manager
from mercure.targets import DeliveryJob, PermanentTargetError, TargetError
from mercure.testing import make_series
from mercure_target_xnat import XnatTarget, XnatTargetConfig
from pydantic import ValidationError
from xnat_test_server import Fault

SESSION = ("PROJ1", "MRN0001", "MRN0001_2026-01-01")  # mercure's labels for make_series


def xnat_config(server: Any, **settings: Any) -> dict[str, Any]:
    return {
        "xnat": {
            "target_type": "xnat",
            "project_id": "PROJ1",
            "host": server.url,
            "user": "router",
            "password": "s3cret",
            "timeout": 10,
            **settings,
        }
    }


def target(server: Any, **settings: Any) -> XnatTarget:
    config = xnat_config(server, **settings)["xnat"]
    config.pop("target_type")
    return XnatTarget("xnat", XnatTargetConfig(**config))


def job_for(files: list[Path]) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="xnat"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task)


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- configuration ------------------------------------------------------------------------------


def test_mercure_entries_load_unchanged() -> None:
    registry = build_plugin_manager().registry
    assert registry.get("target", "xnat").implementation is XnatTarget
    config, _ = validate_config(
        {
            "targets": {
                "x": {
                    "target_type": "xnat",
                    "project_id": "P1",
                    "host": "https://xnat.example.org/",
                    "user": "u",
                    "password": "p",
                    "contact": "",
                    "comment": "",
                }
            }
        },
        registry,
    )
    x = config.targets["x"]
    assert isinstance(x, XnatTargetConfig)
    assert x.host == "https://xnat.example.org"
    assert str(x.subject_label) == "{PatientID}"
    assert str(x.session_label) == "{PatientID}_{StudyDateISO}"
    assert x.overwrite == "append" and x.import_handler == "DICOM-zip"
    for name in ("project_id", "host", "user", "password"):
        assert XnatTargetConfig.model_fields[name].is_required()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"host": "xnat.example.org"}, "host must be XNAT's address with its scheme"),
        ({"project_id": " "}, "must not be empty"),
        ({"session_label": "{PatientsName}"}, "is not a DICOM keyword"),
        ({"subject_label": "a/{PatientID}"}, "has no '/'"),
        ({"overwrite": "always"}, "'append', 'delete' or 'none'"),
        ({"projectid": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_wrong_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    base = {"project_id": "P", "host": "http://h", "user": "u", "password": "p"}
    with pytest.raises(ValidationError, match=message):
        XnatTargetConfig(**{**base, **settings})


def test_config_check_names_the_json_path(tmp_path: Path) -> None:
    entry = {"target_type": "xnat", "project_id": "P", "host": "http://h", "user": "u"}
    with pytest.raises(ConfigError) as caught:
        validate_config({"targets": {"x": entry}}, build_plugin_manager().registry)
    assert [p for p, _ in caught.value.errors] == ["targets.x.password"]
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps({"targets": {"x": {**entry, "password": "p", "timeout": -1}}}))
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
    assert run.returncode != 0 and "targets.x.timeout" in run.stdout + run.stderr


# -- delivery ------------------------------------------------------------------------------------


def test_a_job_arrives_as_one_zip_with_mercures_labels(
    tmp_path: Path, xnat_server: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 12)
    env = dispatch_env.start(xnat_config(xnat_server))
    ref, task = env.deliver(env.job(files, "xnat"))
    assert ref.state == "success", task.error
    (upload,) = xnat_server.state.uploads
    assert upload.params == {
        "inbody": "true",
        "import-handler": "DICOM-zip",
        "PROJECT_ID": "PROJ1",
        "SUBJECT_ID": "MRN0001",
        "EXPT_LABEL": "MRN0001_2026-01-01",
        "overwrite": "append",
        "rename": "true",
    }
    assert sorted(upload.members) == sorted(f.name for f in files)
    held = xnat_server.state.session_files(*SESSION)
    # What XNAT unpacked is byte for byte what was sent.
    assert held == {uid(f): f.read_bytes() for f in files}


def test_labels_come_from_the_configured_patterns(tmp_path: Path, xnat_server: Any) -> None:
    files = make_series(tmp_path / "s", 2, PatientID="P 7/x", AccessionNumber="A.1")
    web = target(xnat_server, session_label="{AccessionNumber}-{Modality}")
    assert len(web.send(job_for(files)).delivered) == 2
    web.close()
    params = xnat_server.state.uploads[0].params
    assert params["SUBJECT_ID"] == "P_7_x"  # only letters, digits, _ and - in XNAT labels
    assert params["EXPT_LABEL"] == "A_1-CT"


def test_one_jsession_serves_every_job_and_ends_at_shutdown(
    tmp_path: Path, xnat_server: Any
) -> None:
    web = target(xnat_server)
    for name in ("a", "b", "c"):
        files = make_series(tmp_path / name, 3)
        assert len(web.send(job_for(files)).delivered) == 3
    state = xnat_server.state
    assert state.logins == 1 and len(state.uploads) == 3
    cookies = {u.cookie for u in state.uploads}
    assert len(cookies) == 1 and None not in cookies
    web.close()
    assert state.logouts == 1 and state.sessions == {}


def test_an_expired_session_is_renewed(tmp_path: Path, xnat_server: Any) -> None:
    web = target(xnat_server)
    assert len(web.send(job_for(make_series(tmp_path / "a", 2))).delivered) == 2
    xnat_server.state.expire_sessions()
    assert len(web.send(job_for(make_series(tmp_path / "b", 2))).delivered) == 2
    web.close()
    assert xnat_server.state.logins == 2


def test_wrong_credentials_go_to_error_at_once(
    tmp_path: Path, xnat_server: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 3)
    env = dispatch_env.start(xnat_config(xnat_server, password="wrong"))
    with pytest.raises(TargetError, match=r"HTTP 401.*check user and password"):
        env.runtime.target("xnat").test_connection()
    ref, task = env.deliver(env.job(files, "xnat"))
    assert ref.state == "error"
    assert len(task.dispatch_state.attempts) == 1 and task.dispatch_state.retries == 0
    assert "refused the login (POST /data/JSESSION) for user 'router'" in task.error
    assert "check user and password" in task.error and "not retried" in task.error
    assert xnat_server.state.uploads == []


def test_a_server_error_is_retried(tmp_path: Path, xnat_server: Any, dispatch_env: Any) -> None:
    files = make_series(tmp_path / "s", 4)
    xnat_server.state.faults.append(Fault(500, "java.lang.NullPointerException"))
    env = dispatch_env.start(xnat_config(xnat_server))
    ref = env.job(files, "xnat")
    ref, task = env.deliver(ref)
    assert ref.state == "outgoing" and task.dispatch_state.retries == 1
    error = task.dispatch_state.attempts[-1].error
    assert "HTTP 500" in error and "NullPointerException" in error and "retried" in error
    assert task.dispatch_state.delivered.get("xnat", []) == []
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    assert len(xnat_server.state.session_files(*SESSION)) == 4


def test_a_slow_server_hits_the_timeout_and_the_reupload_is_idempotent(
    tmp_path: Path, xnat_server: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 5)
    # XNAT takes longer than the timeout, but imports the upload all the same.
    xnat_server.state.faults.append(Fault(delay=2.0, process=True))
    env = dispatch_env.start(xnat_config(xnat_server, timeout=0.5))
    ref = env.job(files, "xnat")
    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    assert "did not answer within 0.5 s (timeout)" in task.dispatch_state.attempts[-1].error
    assert task.dispatch_state.delivered.get("xnat", []) == []
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    held = xnat_server.state.session_files(*SESSION)
    assert held == {uid(f): f.read_bytes() for f in files}  # each instance once, unchanged
    assert len(xnat_server.state.uploads) == 2


def test_a_partial_import_is_not_delivered(
    tmp_path: Path, xnat_server: Any, dispatch_env: Any
) -> None:
    files = sorted(make_series(tmp_path / "s", 6))
    xnat_server.state.unparseable.add(files[3].name)
    env = dispatch_env.start(xnat_config(xnat_server))
    ref, task = env.deliver(env.job(files, "xnat"))
    assert ref.state == "error"  # 400: it cannot succeed as it is
    assert task.dispatch_state.delivered.get("xnat", []) == []
    assert "HTTP 400" in task.error and f"Unable to parse {files[3].name}" in task.error
    assert "prearchive" in task.error
    assert len(xnat_server.state.session_files(*SESSION)) == 3  # XNAT kept a part

    # XNAT is fixed; the operator retries: the whole job goes again and merges.
    xnat_server.state.unparseable.clear()
    task.error = None
    task.dispatch_state.retries = 0
    env.runtime.store.write(ref, task)
    ref, task = env.deliver(env.runtime.store.move(ref, "outgoing"))
    assert ref.state == "success"
    assert xnat_server.state.session_files(*SESSION) == {uid(f): f.read_bytes() for f in files}


@pytest.mark.parametrize(
    ("settings", "status", "text"),
    [
        ({"project_id": "NOPE"}, 404, "No project with ID NOPE"),
        ({"overwrite": "none"}, 409, "already exists"),
    ],
)
def test_refusals_that_cannot_succeed_are_permanent(
    tmp_path: Path, xnat_server: Any, settings: dict[str, Any], status: int, text: str
) -> None:
    files = make_series(tmp_path / "s", 2)
    if status == 409:
        assert len(target(xnat_server).send(job_for(files)).delivered) == 2
    web = target(xnat_server, **settings)
    with pytest.raises(PermanentTargetError, match=rf"HTTP {status}.*{text}"):
        web.send(job_for(files))
    web.close()


def test_the_zip_is_spooled_to_disk_not_built_in_memory(tmp_path: Path, xnat_server: Any) -> None:
    xnat_server.state.keep_bytes = False
    files = make_series(tmp_path / "s", 24, rows=1024, columns=1024)  # 2 MB each
    spool = tmp_path / "spool"
    spool.mkdir()
    web = target(xnat_server, spool_folder=str(spool))
    tracemalloc.start()
    try:
        result = web.send(job_for(files))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        web.close()
    assert len(result.delivered) == 24
    total = sum(f.stat().st_size for f in files)
    assert total > 48 * 1024 * 1024
    # The test server in this process reads one 2 MB member at a time; the target adds chunks.
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for {total / 1e6:.0f} MB"
    assert list(spool.iterdir()) == []  # the spooled zip is gone


def test_connection_test_calls_data_auth(xnat_server: Any) -> None:
    web = target(xnat_server)
    assert web.test_connection() == (
        f"XNAT at {xnat_server.url} accepted user 'router' (GET /data/auth)"
    )
    assert xnat_server.state.auth_checks == 1
    web.close()
    xnat_server.stop()
    with pytest.raises(TargetError, match="cannot connect to XNAT"):
        target(xnat_server).test_connection()


def test_mercure_targets_test_calls_data_auth(tmp_path: Path, xnat_server: Any) -> None:
    folders = {
        f"{name}_folder": str(tmp_path / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps({**folders, "targets": xnat_config(xnat_server)}))
    cli = "from mercure.cli import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", cli, "targets", "test", "xnat", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"xnat: OK: XNAT at {xnat_server.url} accepted user 'router'" in run.stdout
    assert xnat_server.state.auth_checks == 1
