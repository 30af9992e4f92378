"""``mercure study``: the studies being collected, and forcing one to complete now."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.store import JobStore
from mercure.jobs.studies import StudyRef, StudyStore, ensure_collection
from mercure.jobs.task import Task, TaskStudy, read_task
from mercure.services.runtime import build_runtime

app = typer.Typer(help="Studies being collected by study-level rules.", no_args_is_help=True)


def _store(loaded_config: object) -> StudyStore:
    from mercure.config import Config

    assert isinstance(loaded_config, Config)
    jobs = JobStore.from_config(loaded_config, fsync=False)
    return StudyStore(loaded_config.folder("studies"), jobs)


def _task(ref: StudyRef) -> Task | None:
    try:
        return read_task(ref.path)
    except (OSError, ValueError):
        return None


@app.command("list")
def list_studies(
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    config: Path | None = ConfigOption,
) -> None:
    """Studies in studies/: their rule, series received, and how long they have waited."""
    cfg = load(config).config
    store = _store(cfg)
    refs = store.entries()
    if not as_json:
        typer.echo(f"studies: {len(refs)} being collected")
    now = time.time()
    for ref in refs:
        task = _task(ref)
        if task is None or not isinstance(task.study, TaskStudy):
            problem = "task.json missing or unreadable"
            typer.echo(json.dumps({"folder": ref.name, "error": problem})
                       if as_json else f"  {ref.name}  ({problem})")  # fmt: skip
            continue
        study = task.study
        collection = ensure_collection(task)
        assert collection is not None
        row = {
            "id": task.id,
            "study_uid": study.study_uid,
            "rule": collection.rule,
            "trigger": study.complete_trigger,
            "required": study.complete_required_series,
            "series": study.received_series or [],
            "instances": store.instance_count(ref),
            "waiting_s": round(now - collection.created_at),
            "quiet_s": round(now - collection.last_receive_at),
            "force_requested": study.complete_force or store.force_requested(ref),
        }
        if as_json:
            typer.echo(json.dumps(row))
            continue
        forced = "  force requested" if row["force_requested"] else ""
        typer.echo(
            f"  {task.id}  study {study.study_uid}  rule {collection.rule}  "
            f"{len(row['series'])} series / {row['instances']} inst  "
            f"trigger {study.complete_trigger}"
            + (f" {study.complete_required_series!r}" if row["required"] else "")
            + f"  waiting {row['waiting_s']}s, last series {row['quiet_s']}s ago{forced}"
        )


@app.command("complete")
def complete(
    study_uid: str = typer.Argument(..., help="StudyInstanceUID (or the study job's id)."),
    rule: str | None = typer.Option(None, help="Only the study of this rule."),
    config: Path | None = ConfigOption,
) -> None:
    """Force a study to complete now with the series that arrived (mercure's
    ``.force-complete``); the router releases it on its next pass."""
    loaded = load(config)
    store = _store(loaded.config)
    found = []
    for ref in store.entries():
        task = _task(ref)
        if task is None or not isinstance(task.study, TaskStudy):
            continue
        collection = ensure_collection(task)
        if study_uid not in (task.study.study_uid, task.id):
            continue
        if rule is not None and (collection is None or collection.rule != rule):
            continue
        found.append((ref, task))
    if not found:
        raise die(
            f"no study '{study_uid}'{f' of rule {rule}' if rule else ''} is being collected; "
            "`mercure study list` shows those that are (a released study is a job: "
            "`mercure queue`)"
        )
    runtime = build_runtime(loaded.config, loaded.plugins, fsync=True)
    for ref, task in found:
        store.request_force(ref)
        runtime.emit(
            TaskEvent(
                TaskEventType.STUDY_FORCE_REQUESTED,
                task.id,
                task.info.uid,
                info="completion forced from the command line",
                rule=task.info.applied_rule or "",
                extra={"by": "cli"},
            )
        )
        typer.echo(
            f"study {task.info.uid} (job {task.id}, rule {task.info.applied_rule}): completion "
            "requested; the router releases it on its next pass"
        )
