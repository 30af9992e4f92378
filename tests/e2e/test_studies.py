"""Study jobs and operator controls with real DICOM traffic through the receiver.

Each test starts ``mercure run`` (receiver, router, processor, dispatcher in one process) and
sends the series of one study with DCMTK's storescu; studies are collected under
``studies/`` and released by the series that arrived, by timeout, by force completion (each
action) or by ``mercure study complete``. A site plugin writes every task event to a file,
so the tests also check what the ledger and the metrics see.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    DCMTK_STORESCU,
    ProcessFactory,
    event_observer,
    folder_of,
    jobs,
    read_events,
    run_cli,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import DcmtkStoreSCP, free_port, make_series
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MODULE = Path(__file__).parent / "modules" / "stamp.py"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    if not DCMTK_STORESCU.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")


class Study:
    """The series of one synthetic study, made on demand."""

    def __init__(self, root: Path, description: str) -> None:
        self.uid = generate_uid()
        self.root = root / self.uid
        self.description = description

    def series(self, description: str, count: int = 3) -> list[Path]:
        return make_series(
            self.root / description,
            count,
            study_uid=self.uid,
            series_description=description,
            StudyDescription=self.description,
        )


def study_jobs(folder: Path, study_uid: str) -> dict[str, dict[str, Any]]:
    return {i: t for i, t in jobs(folder).items() if t["info"]["uid"] == study_uid}


def delivered(target: Path, job_id: str) -> set[str]:
    return {p.name for p in (target / job_id).glob("*.dcm")}


def names(files: list[Path]) -> set[str]:
    return {p.name for p in files}


def start(
    tmp_path: Path, procs: ProcessFactory, rules: dict[str, Any], **overrides: Any
) -> tuple[dict[str, Any], Path, Path, Path]:
    target = tmp_path / "archive"
    target.mkdir(exist_ok=True)
    site, events = event_observer(tmp_path)
    config = spool_config(
        tmp_path,
        plugin_folder=str(site),
        targets={"archive": {"target_type": "folder", "folder": str(target)}},
        rules=rules,
        **overrides,
    )
    path = write_config(tmp_path / "mercure.json", config)
    procs.start("router", "run", "--config", str(path))
    return config, path, target, events


def study_rule(description: str, **fields: Any) -> dict[str, Any]:
    return {"rule": f"tags.StudyDescription == '{description}'", "target": "archive",
            "action_trigger": "study", **fields}  # fmt: skip


def test_received_series_late_series_and_study_complete(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    rules = {"brain": study_rule(
        "BRAIN",
        study_trigger_condition="received_series",
        study_trigger_series="'Axial T2' and ('Sag T1' or 'Cor T1')",
    )}  # fmt: skip
    config, path, target, events_file = start(
        tmp_path, mercure_processes, rules,
        study_complete_trigger=3600, study_forcecomplete_trigger=3600,
    )  # fmt: skip
    success, studies = folder_of(config, "success"), folder_of(config, "studies")
    study = Study(tmp_path / "in", "BRAIN")
    axial = study.series("Axial T2 FLAIR")
    storescu(axial, config["port"])
    wait_until(lambda: visible_entries(studies), 30, "the study being collected")
    listed = run_cli("study", "list", "--json", "--config", str(path), cwd=tmp_path)
    [row] = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert row["study_uid"] == study.uid and row["series"] == ["Axial T2 FLAIR"]
    queue = run_cli("queue", "--config", str(path), cwd=tmp_path)
    assert "studies: 1 being collected" in queue.stdout

    sag = study.series("Sag T1 MPRAGE")
    storescu(sag, config["port"])  # the required series are in: released at once
    [(first_id, first)] = wait_until(
        lambda: list(study_jobs(success, study.uid).items()), 60, "the study job delivered"
    )
    assert delivered(target, first_id) == names(axial + sag)
    assert first["info"]["uid_type"] == "study" and first["info"]["applied_rule"] == "brain"
    assert first["study"]["received_series"] == ["Axial T2 FLAIR", "Sag T1 MPRAGE"]
    assert first["study"]["complete_trigger"] == "received_series"
    assert first["study"]["complete_force"] is False
    assert visible_entries(studies) == []

    # A late series of the same study starts a second study job; an operator forces it.
    cor = study.series("Cor T1")
    storescu(cor, config["port"])
    wait_until(lambda: visible_entries(studies), 30, "the second study being collected")
    forced = run_cli("study", "complete", study.uid, "--config", str(path), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    wait_until(lambda: len(study_jobs(success, study.uid)) == 2, 60, "the second study job")
    [(second_id, second)] = [(i, t) for i, t in study_jobs(success, study.uid).items()
                             if i != first_id]  # fmt: skip
    assert delivered(target, second_id) == names(cor)
    assert second["study"]["received_series"] == ["Cor T1"]
    assert second["study"]["complete_force"] is True

    missing = run_cli("study", "complete", study.uid, "--config", str(path), cwd=tmp_path)
    assert missing.returncode == 1 and "no study" in missing.stderr

    events = read_events(events_file)
    collected = [e for e in events if e["type"] == "study_collect"]
    assert [e["task_id"] for e in collected] == [first_id, first_id, second_id]
    released = {e["task_id"]: e for e in events if e["type"] == "study_release"}
    assert set(released) == {first_id, second_id}
    assert "required series" in released[first_id]["info"]
    assert "forced" in released[second_id]["info"]
    assert any(e["type"] == "study_force" and e["task_id"] == second_id for e in events)


def test_timeout_releases_the_study_when_a_series_never_comes(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    config, _path, target, _events = start(
        tmp_path, mercure_processes, {"spine": study_rule("SPINE")}, study_complete_trigger=2
    )
    success = folder_of(config, "success")
    study = Study(tmp_path / "in", "SPINE")
    sent = study.series("T1") + study.series("T2")  # a third series, STIR, never comes
    storescu(sent, config["port"])
    [(job_id, task)] = wait_until(
        lambda: list(study_jobs(success, study.uid).items()), 60, "the study job"
    )
    assert delivered(target, job_id) == names(sent)
    assert sorted(task["study"]["received_series"]) == ["T1", "T2"]
    assert task["collection"]["released"].startswith("timeout")


def test_force_completion_discards_or_proceeds(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    never = {"study_trigger_condition": "received_series",
             "study_trigger_series": "'T1' and 'never sent'"}  # fmt: skip
    rules = {
        "drop": study_rule("DROP", study_force_completion_action="discard", **never),
        "keep": study_rule("KEEP", study_force_completion_action="proceed", **never),
    }
    config, _path, target, _events = start(
        tmp_path, mercure_processes, rules,
        study_complete_trigger=3600, study_forcecomplete_trigger=3,
    )  # fmt: skip
    drop, keep = Study(tmp_path / "in", "DROP"), Study(tmp_path / "in", "KEEP")
    dropped, kept = drop.series("T1"), keep.series("T1")
    storescu(dropped + kept, config["port"])
    success, discard = folder_of(config, "success"), folder_of(config, "discard")
    [(kept_id, kept_task)] = wait_until(
        lambda: list(study_jobs(success, keep.uid).items()), 60, "the proceeding study"
    )
    [(drop_id, drop_task)] = wait_until(
        lambda: list(study_jobs(discard, drop.uid).items()), 60, "the discarded study"
    )
    assert delivered(target, kept_id) == names(kept)
    assert kept_task["study"]["complete_force"] is True
    assert names(list((discard / drop_id).glob("*.dcm"))) == names(dropped)
    assert not (target / drop_id).exists()
    assert drop_task["info"]["action"] == "discard"


def test_a_study_both_rule_runs_its_module_on_every_series(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    rules = {"ai": study_rule(
        "AI", action="both", processing_module="stamp",
        study_trigger_condition="received_series", study_trigger_series="'A' and 'B' and 'C'",
    )}  # fmt: skip
    modules = {"stamp": {"command": f"{{python}} {MODULE}", "settings": {"label": "stamped"}}}
    config, _path, target, _events = start(
        tmp_path, mercure_processes, rules, modules=modules,
        study_complete_trigger=3600, study_forcecomplete_trigger=3600,
    )  # fmt: skip
    study = Study(tmp_path / "in", "AI")
    sent = study.series("A", 2) + study.series("B", 3) + study.series("C", 4)
    storescu(sent, config["port"])
    success = folder_of(config, "success")

    def parent_and_child() -> tuple[str, dict[str, Any], str] | None:
        found = study_jobs(success, study.uid)
        parents = [i for i, t in found.items() if not t.get("parent_id")]
        children = [i for i, t in found.items() if t.get("parent_id")]
        return (parents[0], found[parents[0]], children[0]) if parents and children else None

    parent_id, parent, child_id = wait_until(parent_and_child, 90, "the processed study")
    result = json.loads((success / parent_id / "result.json").read_text())
    assert result["inputs"] == 9 and result["tags_files"] == 9  # every series of the study
    assert sorted(parent["study"]["received_series"]) == ["A", "B", "C"]
    assert parent["info"]["uid_type"] == "study"
    assert len(delivered(target, child_id)) == 9


def test_suspend_resume_retry_and_discard_from_the_cli(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    scp_port = free_port()
    rules = {
        "ok": {"rule": "tags.SeriesDescription == 'ok'", "target": "archive"},
        "pacs": {"rule": "tags.SeriesDescription != 'ok'", "target": "pacs"},
    }
    pacs = {"target_type": "dicom", "ip": "127.0.0.1", "port": str(scp_port),
            "aet_target": "STORESCP"}  # fmt: skip
    target = tmp_path / "archive"
    target.mkdir()
    site, events_file = event_observer(tmp_path)
    config = spool_config(
        tmp_path, plugin_folder=str(site), rules=rules, retry_delay=1, retry_max=0,
        targets={"archive": {"target_type": "folder", "folder": str(target)}, "pacs": pacs},
    )  # fmt: skip
    path = write_config(tmp_path / "mercure.json", config)
    outgoing, success = folder_of(config, "outgoing"), folder_of(config, "success")
    error, discard = folder_of(config, "error"), folder_of(config, "discard")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = run_cli(*args, "--config", str(path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done

    cli("suspend", "dispatching", "--reason", "PACS maintenance")
    mercure_processes.start("router", "run", "--config", str(path))
    storescu(make_series(tmp_path / "ok", 2, series_description="ok"), config["port"])
    [job_id] = wait_until(lambda: list(jobs(outgoing)), 30, "the job waiting in outgoing/")
    assert "dispatching: SUSPENDED" in cli("queue").stdout
    assert "PACS maintenance" in cli("queue").stdout
    cli("resume", "dispatching")
    wait_until(lambda: job_id in jobs(success), 30, "the job delivered after resume")

    # Two jobs fail (nothing listens at the PACS port); one is retried, one discarded.
    storescu(make_series(tmp_path / "p1", 2, series_description="p1"), config["port"])
    storescu(make_series(tmp_path / "p2", 2, series_description="p2"), config["port"])
    failed = wait_until(lambda: len(jobs(error)) == 2 and sorted(jobs(error)), 60, "two errors")
    cli("job", "discard", failed[1], "--reason", "sent by mistake")
    assert failed[1] in jobs(discard)
    scp = DcmtkStoreSCP(tmp_path / "scp", scp_port).start()
    try:
        cli("job", "retry", failed[0])
        wait_until(lambda: failed[0] in jobs(success), 60, "the retried job delivered")
        assert len(scp.received()) == 2
    finally:
        scp.stop()
    events = read_events(events_file)
    kinds = [(e["type"], e["task_id"], e["extra"].get("service")) for e in events]
    assert ("suspend", "", "dispatching") in kinds and ("resume", "", "dispatching") in kinds
    assert ("manual_discard", failed[1], None) in kinds
    assert ("retry", failed[0], None) in kinds
    assert "sent by mistake" in jobs(discard)[failed[1]]["history"][-1]
