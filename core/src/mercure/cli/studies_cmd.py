"""``mercure study``: the studies being collected, and forcing one to complete now."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.controls import current_user
from mercure.jobs.store import JobStore
from mercure.jobs.studies import StudyStore
from mercure.operations import OperationError, force_complete_study
from mercure.services.runtime import build_runtime

app = typer.Typer(help="Studies being collected by study-level rules.", no_args_is_help=True)


def _store(loaded_config: object) -> StudyStore:
    from mercure.config import Config

    assert isinstance(loaded_config, Config)
    jobs = JobStore.from_config(loaded_config, fsync=False)
    return StudyStore(loaded_config.folder("studies"), jobs)


@app.command("list")
def list_studies(
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    config: Path | None = ConfigOption,
) -> None:
    """Studies in studies/: their rule, series received, and how long they have waited."""
    cfg = load(config).config
    studies = _store(cfg).open_studies()
    if not as_json:
        typer.echo(f"studies: {len(studies)} being collected")
    now = time.time()
    for study in studies:
        if study.error:
            typer.echo(json.dumps({"folder": study.ref.name, "error": study.error})
                       if as_json else f"  {study.ref.name}  ({study.error})")  # fmt: skip
            continue
        row = {
            "id": study.task_id,
            "study_uid": study.study_uid,
            "rule": study.rule,
            "trigger": study.trigger,
            "required": study.required,
            "series": list(study.series),
            "instances": study.instances,
            "waiting_s": round(now - study.created_at),
            "quiet_s": round(now - study.last_receive_at),
            "force_requested": study.force_requested,
        }
        if as_json:
            typer.echo(json.dumps(row))
            continue
        forced = "  force requested" if row["force_requested"] else ""
        typer.echo(
            f"  {study.task_id}  study {study.study_uid}  rule {study.rule}  "
            f"{len(study.series)} series / {study.instances} inst  "
            f"trigger {study.trigger}"
            + (f" {study.required!r}" if study.required else "")
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
    runtime = build_runtime(loaded.config, loaded.plugins, fsync=True)
    try:
        outcomes = force_complete_study(
            runtime, study_uid, rule=rule, operator=current_user(), by="cli"
        )
    except OperationError as exc:
        raise die(str(exc)) from None
    for outcome in outcomes:
        typer.echo(outcome.message)
