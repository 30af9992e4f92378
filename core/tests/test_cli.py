"""The ``mercure`` command line, run in-process with typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme
import typer
from mercure.jobs.store import STATES, JobRef, JobStore
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, read_task
from mercure.testing import make_series
from typer.testing import CliRunner, Result

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    from mercure import cli as cli_module

    if not cli_module.app.registered_groups:  # build once per process
        cli_module._build()
    return cli_module.app


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MERCURE_CONFIG", raising=False)
    monkeypatch.delenv("MERCURE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def run(cli: typer.Typer, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    """A configuration file with its spool under tmp_path and a folder target ``archive``."""
    (tmp_path / "archive").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        f"{name}_folder": str(tmp_path / "spool" / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    data["targets"] = {
        "archive": {"target_type": "folder", "folder": str(tmp_path / "archive")},
        "missing": {"target_type": "folder", "folder": str(tmp_path / "no-such-folder")},
    }
    data["rules"] = {
        "ct": {"rule": "tags.Modality == 'CT'", "target": "archive"},
        "scouts": {"rule": "'LOCALIZER' in tags.ImageType", "action": "discard"},
        "fb": {"rule": "False", "target": "archive", "fallback": True},
        "off": {"rule": "True", "target": "archive", "disabled": True},
    }
    data.update(overrides)
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(data, indent=2))
    return path


# -- config ------------------------------------------------------------------------------------


def test_config_check_valid(cli: typer.Typer, tmp_path: Path) -> None:
    # mercure's example names a CA bundle of its host; the installed webhook notifier checks
    # that the file exists, so this copy points at one that does.
    data = json.loads((DATA / "mercure_full.json").read_text())
    ca = tmp_path / "hooks.pem"
    ca.write_text(trustme.CA().cert_pem.bytes().decode())
    data["webhook_certificate_location"] = str(ca)
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(data))
    result = run(cli, "config", "check", str(path))
    assert result.exit_code == 0, result.output
    assert "valid (2 targets, 7 rules, 2 modules)" in result.output
    assert "rules.study_rule" not in result.output  # study rules are supported


def test_config_check_invalid_prints_every_error(
    cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built-ins only: the xnat target plugin may be installed in this environment.
    from mercure.cli import context

    monkeypatch.setenv("MERCURE_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr(context, "_MANAGERS", {})  # the CLI keeps its plugin manager
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "port": "abc",
                "targets": {
                    "x": {"target_type": "xnat"},
                    "f": {"target_type": "folder"},
                },
                "rules": {
                    "r": {"rule": "__import__('os')", "target": "nope", "action": "route"},
                    "q": {"rule": "True", "target": "f", "action": "forward"},
                },
            }
        )
    )
    result = run(cli, "config", "check", str(path))
    assert result.exit_code == 1
    for expected in (
        "port:",
        "targets.x.target_type:",
        "pip install mercure-target-xnat",
        "targets.f.folder:",
        "rules.q.action:",
    ):
        assert expected in result.output, expected
    assert ": valid (" not in result.output


def test_config_check_reports_references_and_rule_errors(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "targets": {"t": {"target_type": "dummy"}},
                "rules": {
                    "r": {"rule": "__import__('os')", "target": "nope"},
                    "p": {"rule": "True", "action": "process", "processing_module": "ai"},
                },
            }
        )
    )
    result = run(cli, "config", "check", str(path))
    assert result.exit_code == 1
    assert "rules.r.rule:" in result.output and "column 1" in result.output
    assert "rules.r.target:" in result.output
    assert "rules.p.processing_module:" in result.output
    assert "3 error(s)" in result.output


def test_config_check_bad_json(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"port": 104,}')
    result = run(cli, "config", "check", str(path))
    assert result.exit_code == 1
    assert "not valid JSON" in result.output


def test_config_init_writes_a_config_that_checks(cli: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    result = run(cli, "config", "init", str(path), "--data", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["incoming_folder"] == str((tmp_path / "data" / "incoming").resolve())
    check = run(cli, "config", "check", str(path))
    assert check.exit_code == 0, check.output
    assert "valid (1 targets, 1 rules, 0 modules)" in check.output

    path.write_text('{"port": 104}')
    again = run(cli, "config", "init", str(path))
    assert again.exit_code == 1
    assert "--force" in again.output
    assert path.read_text() == '{"port": 104}'
    forced = run(cli, "config", "init", str(path), "--force")
    assert forced.exit_code == 0
    assert json.loads(path.read_text())["rules"]["route_all"]["target"] == "local_folder"


# -- rules test --------------------------------------------------------------------------------


def test_rules_test_rule_against_a_dicom_file(cli: typer.Typer, tmp_path: Path) -> None:
    (dcm,) = make_series(tmp_path / "series", 1, series_description="THORAX", modality="CT")
    result = run(cli, "rules", "test", str(dcm), "--rule", "@Modality@ == 'CT'")
    assert result.exit_code == 0, result.output
    assert "result: True" in result.output
    result = run(
        cli, "rules", "test", str(dcm), "--rule", "'LUNG' in tags.SeriesDescription.upper()"
    )
    assert result.exit_code == 3
    assert "result: False" in result.output


def test_rules_test_explains_missing_tags(cli: typer.Typer, tmp_path: Path) -> None:
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"Modality": "MR"}))
    result = run(cli, "rules", "test", str(tags), "-r", "tags.BodyPartExamined != 'HEAD'")
    assert result.exit_code == 3
    assert "missing tags: BodyPartExamined" in result.output


def test_rules_test_rejects_a_forbidden_rule(cli: typer.Typer, tmp_path: Path) -> None:
    tags = tmp_path / "tags.json"
    tags.write_text("{}")
    result = run(cli, "rules", "test", str(tags), "-r", "__import__('os').system('id')")
    assert result.exit_code == 1
    assert "column 1" in result.output


def test_rules_test_with_a_config(cli: typer.Typer, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps({"Modality": "CT", "ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}))
    result = run(cli, "rules", "test", str(tags), "--config", str(config))
    assert result.exit_code == 0, result.output
    for name in ("ct", "scouts", "fb", "off"):
        assert f"rule '{name}'" in result.output
    assert "rule 'off' (disabled)" in result.output
    assert "rule 'fb' (fallback)" in result.output
    assert "=> triggered: ct" in result.output

    tags.write_text(json.dumps({"Modality": "CT", "ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}))
    result = run(cli, "rules", "test", str(tags), "--config", str(config))
    assert "=> discarded by rule 'scouts'" in result.output

    tags.write_text(json.dumps({"Modality": "MR"}))
    result = run(cli, "rules", "test", str(tags), "--config", str(config))
    assert "=> triggered (fallback): fb" in result.output
    assert "missing tags: ImageType" in result.output

    result = run(cli, "rules", "test", str(tags), "--config", str(config), "--name", "nope")
    assert result.exit_code == 1
    assert "no rule named 'nope'" in result.output


# -- queue and jobs ----------------------------------------------------------------------------


def make_job(store: JobStore, tmp_path: Path, state: Any, task_id: str, **fields: Any) -> None:
    src = tmp_path / "src" / task_id
    src.mkdir(parents=True)
    (src / "1.2.3.1.dcm").write_bytes(b"x")
    (src / "1.2.3.2.dcm").write_bytes(b"y")
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3", mrn="M", acc="A"),
        id=task_id,
        dispatch=TaskDispatch(
            target_name="archive", series_uid="1.2.3", retries=fields.pop("retries", 0)
        ),
        **fields,
    )
    store.create(state, task, sorted(src.iterdir()))


@pytest.fixture
def queue_setup(tmp_path: Path) -> tuple[Path, JobStore]:
    config = write_config(tmp_path)
    data = json.loads(config.read_text())
    store = JobStore(
        {
            s: Path(data[f"{s}_folder"])
            for s in ("outgoing", "processing", "success", "error", "discard")
        },
        fsync=False,
    )
    make_job(store, tmp_path, "outgoing", "aaaa-out")
    make_job(
        store,
        tmp_path,
        "error",
        "bbbb-err",
        retries=6,
        error="gave up after 6 tries: archive: folder /x does not exist",
    )
    make_job(store, tmp_path, "success", "cccc-ok")
    return config, store


def test_queue_lists_jobs_by_state_with_errors(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore]
) -> None:
    config, _ = queue_setup
    result = run(cli, "queue", "--config", str(config))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "outgoing: 1 job(s)" in out
    assert "error: 1 job(s)" in out
    assert "success: 1 job(s)" in out
    assert "discard: 0 job(s)" in out
    err_line = next(line for line in out.splitlines() if "bbbb-err" in line)
    assert "error: gave up after 6 tries: archive: folder /x does not exist" in err_line
    assert "2 inst" in err_line

    only = run(cli, "queue", "--config", str(config), "--state", "error", "--json")
    rows = [json.loads(line) for line in only.output.splitlines()]
    assert [(r["id"], r["state"], r["retries"]) for r in rows] == [("bbbb-err", "error", 6)]

    bad = run(cli, "queue", "--config", str(config), "--state", "nowhere")
    assert bad.exit_code == 1
    assert "unknown state" in bad.output


def test_queue_survives_an_unreadable_task_file(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore]
) -> None:
    config, store = queue_setup
    ref = store.find_exact("aaaa-out")
    assert ref is not None
    (ref.path / "task.json").write_text("{not json")
    result = run(cli, "queue", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "aaaa-out  (task.json unreadable" in result.output
    assert "bbbb-err" in result.output


def test_queue_json_stays_json_with_an_unreadable_task_file(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore]
) -> None:
    config, store = queue_setup
    ref = store.find_exact("aaaa-out")
    assert ref is not None
    (ref.path / "task.json").write_text("{not json")
    result = run(cli, "queue", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    bad = next(r for r in rows if r["id"] == "aaaa-out")
    assert "task.json unreadable" in bad["error"]
    assert {r["id"] for r in rows} == {"aaaa-out", "bbbb-err", "cccc-ok"}


def test_queue_skips_jobs_that_move_while_it_lists(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running dispatcher moves jobs between the listing and the reading: no traceback."""
    config, _ = queue_setup
    real_list = JobStore.list

    def racing_list(self: JobStore, states: Any = STATES) -> list[JobRef]:
        refs = real_list(self, states)
        # A job that was in these states when listed, and has moved on since.
        return refs + [JobRef("dddd-moved", s, self.folders[s] / "dddd-moved") for s in states]

    monkeypatch.setattr(JobStore, "list", racing_list)
    result = run(cli, "queue", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "dddd-moved" not in result.output
    assert "bbbb-err" in result.output and "aaaa-out" in result.output


def test_job_show(cli: typer.Typer, queue_setup: tuple[Path, JobStore]) -> None:
    config, _ = queue_setup
    result = run(cli, "job", "show", "bbbb", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "job bbbb-err: error" in result.output
    assert "instances: 2" in result.output
    assert '"error": "gave up after 6 tries' in result.output
    missing = run(cli, "job", "show", "zzzz", "--config", str(config))
    assert missing.exit_code == 1
    assert "no job 'zzzz'" in missing.output


def test_job_retry_moves_an_error_job_back(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore]
) -> None:
    config, store = queue_setup
    result = run(cli, "job", "retry", "bbbb", "--config", str(config))
    assert result.exit_code == 0, result.output
    ref = store.find_exact("bbbb-err")
    assert ref is not None and ref.state == "outgoing"
    task = read_task(ref.path)
    assert task.error is None
    assert task.dispatch_state is not None
    assert task.dispatch_state.retries == 0
    assert task.dispatch_state.next_retry_at == 0
    assert any("manual retry after: gave up after 6 tries" in h for h in task.history)
    assert len(list(ref.path.glob("*.dcm"))) == 2


def test_job_retry_refuses_a_job_not_in_error(
    cli: typer.Typer, queue_setup: tuple[Path, JobStore]
) -> None:
    config, store = queue_setup
    for task_id, state in (("aaaa-out", "outgoing"), ("cccc-ok", "success")):
        result = run(cli, "job", "retry", task_id, "--config", str(config))
        assert result.exit_code == 1
        assert f"is in {state}/, not error/" in result.output
        ref = store.find_exact(task_id)
        assert ref is not None and ref.state == state


# -- plugins and targets -----------------------------------------------------------------------


def test_plugins_lists_builtins(cli: typer.Typer) -> None:
    result = run(cli, "plugins")
    assert result.exit_code == 0, result.output
    for line in ("builtin_folder_target", "builtin_dummy_target", "builtin_dicom_receiver"):
        assert line in result.output
    assert "target:folder" in result.output
    rows = json.loads(run(cli, "plugins", "--json").output)
    builtin = {r["name"]: r for r in rows if r["source"] == "built-in"}
    assert builtin["builtin_folder_target"]["distribution"] == "mercure-core"
    assert builtin["builtin_folder_target"]["types"] == ["target:folder"]


def test_targets_list_and_test(cli: typer.Typer, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    listed = run(cli, "targets", "list", "--config", str(config))
    assert listed.exit_code == 0
    assert "archive  folder" in listed.output
    ok = run(cli, "targets", "test", "archive", "--config", str(config))
    assert ok.exit_code == 0, ok.output
    assert "archive: OK" in ok.output
    failed = run(cli, "targets", "test", "missing", "--config", str(config))
    assert failed.exit_code == 1
    assert "missing: FAILED" in failed.output
    assert "no-such-folder" in failed.output
    unknown = run(cli, "targets", "test", "nope", "--config", str(config))
    assert unknown.exit_code == 1
    assert "no target named 'nope'" in unknown.output


def test_config_from_environment(
    cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    monkeypatch.setenv("MERCURE_CONFIG", str(config))
    result = run(cli, "targets", "list")
    assert result.exit_code == 0
    assert "archive" in result.output and "missing" in result.output
