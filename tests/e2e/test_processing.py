"""Processing with the built-in ``local`` runner, with real DICOM traffic through the receiver.

Series go in with DCMTK's storescu; ``mercure run`` processes (the whole router, or its
services apart: receiver and router in one, processors in others) route them to ``process``
and ``both`` rules whose module is ``modules/stamp.py``, a mercure processing module written
for these tests (it reads ``task.json`` and its settings, writes new DICOM instances and a
``result.json``). The results go to a folder target and to DCMTK's storescp. Events and the
metrics derived from them are recorded by a site plugin that observes ``on_task_event``.
"""

from __future__ import annotations

import array
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from e2e_support import (
    ProcessFactory,
    event_observer,
    folder_of,
    jobs,
    read_events,
    read_task,
    run_cli,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import DcmtkStoreSCP, free_port, make_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MODULE = Path(__file__).parent / "modules" / "stamp.py"


def module(**settings: Any) -> dict[str, Any]:
    return {"command": f"{{python}} {MODULE}", "settings": settings}


def job_of_rule(folder: Path, rule: str) -> tuple[str, dict[str, Any]] | None:
    for job_id, task in jobs(folder).items():
        if task["info"].get("applied_rule") == rule and not task.get("parent_id"):
            return job_id, task
    return None


def series_of(folder: Path, description: str, count: int) -> list[Path]:
    return make_series(folder / description, count, series_description=description)


def descriptions(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription) for f in files}


def dicoms(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.dcm"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_process_and_both_rules_run_the_module_and_deliver_its_results(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    folder_target = tmp_path / "archive"
    folder_target.mkdir()
    scp = DcmtkStoreSCP(tmp_path / "scp", free_port()).start()
    site, events_file = event_observer(tmp_path)
    try:
        config = spool_config(
            tmp_path,
            plugin_folder=str(site),
            targets={
                "archive": {"target_type": "folder", "folder": str(folder_target)},
                "scp": {
                    "target_type": "dicom",
                    "ip": "127.0.0.1",
                    "port": str(scp.port),
                    "aet_target": "STORESCP",
                },
            },
            modules={"stamp": module(label="from-module", factor=2)},
            rules={
                "proc": {
                    "rule": "tags.SeriesDescription == 'proc'",
                    "action": "process",
                    "processing_module": "stamp",
                    "processing_settings": {"label": "processed-p"},
                },
                "both": {
                    "rule": "tags.SeriesDescription == 'both'",
                    "action": "both",
                    "target": ["archive", "scp"],
                    "processing_module": "stamp",
                    "processing_settings": {"label": "processed-b"},
                },
            },
        )
        config_path = write_config(tmp_path / "mercure.json", config)
        success = folder_of(config, "success")
        router = mercure_processes.start("router", "run", "--config", str(config_path))
        proc_series = series_of(tmp_path / "in", "proc", 3)
        both_series = series_of(tmp_path / "in", "both", 4)
        storescu(proc_series + both_series, config["port"])

        found = wait_until(lambda: job_of_rule(success, "proc"), 60, "the process job in success/")
        proc_id, proc_task = found
        wait_until(lambda: len(scp.received()) == 4, 60, "the results at storescp")
        wait_until(
            lambda: sum(len(dicoms(d)) for d in visible_entries(folder_target)) == 4,
            30,
            "the results in the folder target",
        )

        # process: success/ holds the module's outputs (not the inputs), result.json, task.json.
        job = success / proc_id
        outputs = dicoms(job)
        assert len(outputs) == 3
        assert descriptions(outputs) == {"processed-p"}
        sent_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in proc_series}
        out_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in outputs}
        assert not sent_uids & out_uids
        result = json.loads((job / "result.json").read_text())
        assert result["settings"] == {"label": "processed-p", "factor": 2}  # module + rule
        assert result["inputs"] == 3 and result["tags_files"] == 3
        assert all("#" in name for name in result["input_names"])  # mercure's file names
        assert proc_task["process"]["output"] == result
        assert proc_task["process"]["settings"] == {"label": "processed-p", "factor": 2}
        assert proc_task["error"] is None
        assert not (job / "work").exists() and not (job / "result").exists()
        record = json.loads((job / "processing.json").read_text())
        assert record["phase"] == "finished" and record["steps"][0]["exit_code"] == 0
        log_file = job / record["steps"][0]["log_file"]
        assert "settings" in log_file.read_text()

        # both: the parent keeps the results, a new job linked to it delivered them.
        parent = job_of_rule(success, "both")
        assert parent is not None
        parent_id, _parent_task = parent

        def children_done() -> list[dict[str, Any]]:
            return [t for t in jobs(success).values() if t.get("parent_id") == parent_id]

        # The files reach the targets before their job is recorded and moved to success/.
        children = wait_until(children_done, 30, "the results' job in success/")
        assert len(children) == 1
        child = children[0]
        assert sorted(child["dispatch"]["target_name"]) == ["archive", "scp"]
        assert len(child["dispatch"]["delivered"]["scp"]) == 4
        assert descriptions(scp.received()) == {"processed-b"}
        (delivered_dir,) = visible_entries(folder_target)
        assert delivered_dir.name == child["id"]
        assert descriptions(dicoms(delivered_dir)) == {"processed-b"}
        assert {p.name for p in dicoms(delivered_dir)} == {
            p.name for p in dicoms(success / parent_id)
        }

        # Events with durations, and the metrics derived from them.
        events = read_events(events_file)
        of_proc = [e for e in events if e["task_id"] == proc_id]
        kinds = [e["type"] for e in of_proc]
        for kind in (
            "process",
            "process_begin",
            "process_module_begin",
            "process_module_complete",
            "process_complete",
            "complete",
        ):
            assert kind in kinds, f"{kind} missing from {kinds}"
        finished = next(e for e in of_proc if e["type"] == "process_module_complete")
        assert finished["target"] == "stamp" and finished["extra"]["exit_code"] == 0
        assert finished["extra"]["duration"] > 0
        names = {m[0] for e in of_proc for m in e["metrics"]}
        assert {
            "processing.started",
            "processing.module_duration",
            "processing.duration",
            "processing.completed",
            "jobs.completed",
        } <= names

        # mercure queue / job show describe the processing jobs.
        shown = run_cli("job", "show", proc_id, "--config", str(config_path), cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert "step 1 stamp: done, exit code 0" in shown.stdout
        assert "log tail:" in shown.stdout
        listed = run_cli("queue", "--json", "--config", str(config_path), cwd=tmp_path)
        rows = {json.loads(line)["id"]: json.loads(line) for line in listed.stdout.splitlines()}
        assert rows[proc_id]["processing"]["modules"] == ["stamp"]
        assert "finished" in rows[proc_id]["processing"]["state"]
        assert rows[child["id"]]["parent_id"] == parent_id
        assert router.terminate() == 0
    finally:
        scp.stop()


def test_failing_modules_end_in_error_with_the_precise_reason(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    pids = tmp_path / "hang-pids.txt"
    rules = {
        name: {
            "rule": f"tags.SeriesDescription == '{name}'",
            "action": "process",
            "processing_module": name,
        }
        for name in ("crash", "hang", "silent", "garbled")
    }
    config = spool_config(
        tmp_path,
        modules={
            "crash": module(exit_code=1),
            "hang": {**module(behaviour="hang", pids=str(pids)), "timeout": 3},
            "silent": module(behaviour="nothing"),
            "garbled": module(behaviour="bad_result"),
        },
        rules=rules,
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    error = folder_of(config, "error")
    router = mercure_processes.start("router", "run", "--config", str(config_path))
    files = [f for name in rules for f in series_of(tmp_path / "in", name, 2)]
    storescu(files, config["port"])

    wait_until(lambda: len(jobs(error)) == 4, 90, "four jobs in error/")
    by_rule = {t["info"]["applied_rule"]: (i, t) for i, t in jobs(error).items()}
    reasons = {rule: t["error"] for rule, (_i, t) in by_rule.items()}
    assert reasons["crash"].startswith(
        "processing failed at step 1 of 1: module 'crash' exited with code 1"
    )
    assert "log tail:" in reasons["crash"] and "module crash settings" in reasons["crash"]
    assert (
        "module 'hang' did not finish within its timeout of 3 s and was stopped"
        in (reasons["hang"])
    )
    assert "hanging" in reasons["hang"]  # its log tail
    assert (
        "module 'silent' exited with code 0 but wrote nothing to its output folder"
        in (reasons["silent"])
    )
    assert (
        "module 'garbled' wrote a malformed result.json: result.json is not valid JSON"
        in (reasons["garbled"])
    )
    for rule, (job_id, task) in by_rule.items():
        assert task["info"]["fail_stage"] == "PROCESSING"
        # The original inputs are kept for a retry.
        assert len(dicoms(error / job_id)) == 2, rule
    # The hung module and the child it started are gone.
    module_pid, child_pid = (int(p) for p in pids.read_text().split())
    wait_until(lambda: not alive(module_pid) and not alive(child_pid), 10, "no process left")

    listed = run_cli("queue", "--state", "error", "--config", str(config_path), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if by_rule["crash"][0] in x)
    assert "[crash: failed at step 1/1 (crash)]" in line and "exited with code 1" in line
    assert "log: " in line
    assert router.terminate() == 0


def test_chain_retain_dynamic_routing_and_notification_text(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    archive, chosen = tmp_path / "archive", tmp_path / "chosen"
    archive.mkdir()
    chosen.mkdir()
    config = spool_config(
        tmp_path,
        targets={
            "archive": {"target_type": "folder", "folder": str(archive)},
            "chosen": {"target_type": "folder", "folder": str(chosen)},
            "forbidden": {"target_type": "folder", "folder": str(tmp_path / "forbidden")},
        },
        modules={
            "first": module(label="step-1"),
            "second": module(label="step-2"),
            "router_module": module(
                label="routed",
                route={"route-ok": "chosen", "route-bad": "forbidden"},
                note="routed it",
            ),
            "noter": module(label="noted", note="found 3 nodules", request=True),
        },
        plugins={"notifiers": {"log": {}}},
        rules={
            "chain": {
                "rule": "tags.SeriesDescription == 'chain'",
                "action": "process",
                "processing_module": ["first", "second"],
                "processing_retain_images": True,
            },
            "dynamic": {
                "rule": "tags.SeriesDescription.startswith('route-')",
                "action": "both",
                "target": "archive",
                "processing_module": "router_module",
                "dynamic_routing": True,
                "dynamic_routing_allowed_targets": ["chosen", "archive"],
            },
            "note": {
                "rule": "tags.SeriesDescription == 'note'",
                "action": "process",
                "processing_module": "noter",
                "notification_trigger_reception": False,
                "notification_trigger_completion": False,
                "notification_trigger_completion_on_request": True,
            },
        },
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    success = folder_of(config, "success")
    outbox_done = Path(config["outgoing_folder"]).parent / "outbox" / "done"
    router = mercure_processes.start("router", "run", "--config", str(config_path))
    chain_in = series_of(tmp_path / "in", "chain", 3)
    storescu(
        chain_in
        + series_of(tmp_path / "in", "route-ok", 2)
        + series_of(tmp_path / "in", "route-bad", 2)
        + series_of(tmp_path / "in", "note", 1),
        config["port"],
    )

    def delivered() -> bool:
        return len(visible_entries(chosen)) == 1 and len(visible_entries(archive)) == 1

    wait_until(lambda: job_of_rule(success, "chain") and delivered(), 90, "all results")

    # Chain: the second module got the first one's output; the inputs were kept.
    chain_id, chain_task = job_of_rule(success, "chain")  # type: ignore[misc]
    job = success / chain_id
    files = dicoms(job)
    assert len(files) == 6
    assert Counter(descriptions([f]).pop() for f in files) == {"step-2": 3, "chain": 3}
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in chain_in}
    kept = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files if "chain" in descriptions([f])}
    assert kept == sent
    result = json.loads((job / "result.json").read_text())
    assert [step[0] for step in result] == ["first", "second"]
    assert result[0][1]["input_descriptions"] == ["chain"]
    assert result[1][1]["input_descriptions"] == ["step-1"]
    assert [p["output"]["module"] for p in chain_task["process"]] == ["first", "second"]

    # Dynamic routing: the allowed target the module named; a refused one falls back.
    (ok_dir,) = visible_entries(chosen)
    assert descriptions(dicoms(ok_dir)) == {"routed"}
    assert read_task(success / ok_dir.name)["dispatch"]["target_name"] == "chosen"  # type: ignore[index]
    (fallback_dir,) = visible_entries(archive)
    assert descriptions(dicoms(fallback_dir)) == {"routed"}
    assert not (tmp_path / "forbidden").exists()
    parent_id = read_task(success / fallback_dir.name)["parent_id"]  # type: ignore[index]
    # The results are handed to the dispatcher just before their parent moves to success/.
    refused_parent = wait_until(lambda: read_task(success / parent_id), 30, "the parent job")
    assert any(
        "__mercure_routing refused: forbidden not in the rule's dynamic_routing_allowed_targets"
        in line
        for line in refused_parent["history"]
    )

    # The dispatcher's completion notification of delivered results carries the module's text.
    records = wait_until(
        lambda: list((outbox_done / ok_dir.name).glob("*.json")), 30, "a delivery notification"
    )
    notes = [json.loads(p.read_text())["notification"] for p in records]
    completion = [n for n in notes if n["event"] == "completion"]
    assert [n["details"] for n in completion] == ["router_module: routed it"]

    # The module's notification text, sent on its request though completion is off.
    note_id, _ = wait_until(lambda: job_of_rule(success, "note"), 30, "the note job")
    records = wait_until(
        lambda: list((outbox_done / note_id).glob("*.json")), 30, "the completion notification"
    )
    (entry,) = [json.loads(p.read_text()) for p in records]
    assert entry["notification"]["event"] == "completion"
    assert entry["notification"]["details"] == "noter: found 3 nodules"
    assert router.terminate() == 0


def test_retry_of_a_failed_processing_job_runs_it_again_from_its_inputs(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    flag, runs = tmp_path / "flag", tmp_path / "runs.txt"
    config = spool_config(
        tmp_path,
        modules={"picky": module(behaviour="fail_unless", flag=str(flag), runs_log=str(runs))},
        rules={"all": {"rule": "True", "action": "process", "processing_module": "picky"}},
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    error, success = folder_of(config, "error"), folder_of(config, "success")
    router = mercure_processes.start("router", "run", "--config", str(config_path))
    sent = make_series(tmp_path / "in", 3, series_description="picky")
    storescu(sent, config["port"])
    (job_id,) = wait_until(lambda: list(jobs(error)), 60, "the job in error/")
    assert "exited with code 1" in jobs(error)[job_id]["error"]

    flag.touch()
    retried = run_cli("job", "retry", job_id, "--config", str(config_path), cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "processing/" in retried.stdout and "attempt 2" in retried.stdout
    wait_until(lambda: (success / job_id).is_dir(), 60, "the retried job in success/")
    job = success / job_id
    assert len(dicoms(job)) == 3 and descriptions(dicoms(job)) == {"processed"}
    record = json.loads((job / "processing.json").read_text())
    assert record["attempt"] == 2 and record["earlier_attempts"]
    assert [line.split()[0] for line in runs.read_text().splitlines()] == [
        "start",
        "failed",
        "start",
        "end",
    ]
    task = read_task(job)
    assert task is not None and task["error"] is None
    assert any("manual retry of processing" in line for line in task["history"])
    assert router.terminate() == 0


def test_two_processors_run_each_of_20_jobs_exactly_once(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    runs = tmp_path / "runs.txt"
    config = spool_config(
        tmp_path,
        modules={"stamp": module(runs_log=str(runs), sleep=0.2)},
        rules={"all": {"rule": "True", "action": "process", "processing_module": "stamp"}},
    )
    config_path = str(write_config(tmp_path / "mercure.json", config))
    success = folder_of(config, "success")
    front = mercure_processes.start(
        "front", "run", "--config", config_path, "--only", "receiver,router"
    )
    processors = [
        mercure_processes.start(
            f"processor{i}", "run", "--config", config_path, "--only", "processor"
        )
        for i in range(2)
    ]
    files = [f for i in range(20) for f in make_series(tmp_path / "in" / str(i), 2)]
    storescu(files, config["port"])
    wait_until(lambda: len(visible_entries(success)) == 20, 120, "20 jobs in success/")

    lines = [line.split() for line in runs.read_text().splitlines()]
    starts = Counter(task_id for event, task_id, *_ in lines if event == "start")
    assert len(starts) == 20 and set(starts.values()) == {1}, starts
    assert set(starts) == {p.name for p in visible_entries(success)}
    assert visible_entries(folder_of(config, "processing")) == []
    by_processor = [
        sum(1 for e in p.events() if e.get("event") == "processing finished") for p in processors
    ]
    print(f"jobs finished per processor: {by_processor}")
    assert sum(by_processor) == 20
    for proc in (front, *processors):
        assert proc.terminate() == 0


def test_a_processor_killed_mid_module_is_replaced_and_the_job_completes_once(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    runs = tmp_path / "runs.txt"
    config = spool_config(
        tmp_path,
        modules={"slow": module(runs_log=str(runs), sleep=3)},
        rules={"all": {"rule": "True", "action": "process", "processing_module": "slow"}},
    )
    config_path = str(write_config(tmp_path / "mercure.json", config))
    success, processing = folder_of(config, "success"), folder_of(config, "processing")
    front = mercure_processes.start(
        "front", "run", "--config", config_path, "--only", "receiver,router"
    )
    processor = mercure_processes.start(
        "processor", "run", "--config", config_path, "--only", "processor"
    )
    storescu(make_series(tmp_path / "in", 2), config["port"])
    wait_until(lambda: runs.exists() and "start" in runs.read_text(), 60, "the module to start")
    (job_dir,) = visible_entries(processing)

    def handle_written() -> str | None:
        record = json.loads((job_dir / "processing.json").read_text())
        return record["steps"][0]["handle"]

    handle = wait_until(handle_written, 10, "the run's handle in processing.json")
    processor.kill()  # SIGKILL in the middle of the module's run
    assert "end" not in runs.read_text(), "the module finished before the kill"
    time.sleep(0.5)
    processor.start()
    wait_until(lambda: (success / job_dir.name).is_dir(), 60, "the job in success/")

    events = [line.split()[0] for line in runs.read_text().splitlines()]
    assert events == ["start", "end"], events  # one run, followed by the new processor
    record = json.loads((success / job_dir.name / "processing.json").read_text())
    assert record["steps"][0]["handle"] == handle and record["attempt"] == 1
    assert len(dicoms(success / job_dir.name)) == 2
    for proc in (front, processor):
        assert proc.terminate() == 0


def test_module_contract_example_in_the_docs_runs_unchanged(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    """The complete example module of docs/processing.md, through a ``process`` rule."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "processing.md"
    text = docs.read_text()
    start = text.index("```python\n", text.index("## A complete example module")) + 10
    example = tmp_path / "invert.py"
    example.write_text(text[start : text.index("```", start)])
    config = spool_config(
        tmp_path,
        modules={"invert": {"command": f"{sys.executable} {example}", "settings": {}}},
        rules={
            "all": {
                "rule": "True",
                "action": "process",
                "processing_module": "invert",
                "processing_settings": {"series_description": "INVERTED"},
            }
        },
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    success = folder_of(config, "success")
    router = mercure_processes.start("router", "run", "--config", str(config_path))
    sent = make_series(tmp_path / "in", 2)
    storescu(sent, config["port"])
    (job_id,) = wait_until(lambda: list(jobs(success)), 60, "the job in success/")
    outputs = dicoms(success / job_id)
    assert len(outputs) == 2 and descriptions(outputs) == {"INVERTED"}
    original = pydicom.dcmread(sent[0])
    inverted = next(pydicom.dcmread(p) for p in outputs if pydicom.dcmread(p).InstanceNumber == 1)
    assert original.InstanceNumber == 1
    before = array.array("H", original.PixelData)
    after = array.array("H", inverted.PixelData)
    assert list(after) == [max(before) - v for v in before]
    result = json.loads((success / job_id / "result.json").read_text())
    assert result["__mercure_notification"]["text"] == "inverted 2 image(s)"
    assert router.terminate() == 0
