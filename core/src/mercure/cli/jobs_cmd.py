"""``mercure queue`` and ``mercure job``: where is a series, why did it fail, send it again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.config import Config
from mercure.controls import current_user
from mercure.jobs.claims import claim_owner, is_claimed
from mercure.jobs.incoming import instance_files
from mercure.jobs.store import STATES, JobRef, JobStore
from mercure.jobs.task import Task
from mercure.ledger.query import JobHistory
from mercure.operations import (  # noqa: F401 - failed_in_processing: kept importable here
    OperationError,
    discard_job,
    failed_in_processing,
    retry_job,
)
from mercure.processing.folders import processes_of
from mercure.processing.record import ProcessingRecord, read_record
from mercure.services.runtime import build_runtime

job_app = typer.Typer(help="Show or retry one job.", no_args_is_help=True)


def _operator() -> str:
    """Who ran the command, for the ledger's record of operator actions."""
    return current_user()


def install(app: typer.Typer) -> None:
    app.command("queue")(queue)
    app.add_typer(job_app, name="job")


def queue(
    state: list[str] = typer.Option(
        [],
        "--state",
        "-s",
        help="Only these states (outgoing, processing, success, error, discard).",
    ),
    series: str | None = typer.Option(None, help="Only jobs of this SeriesInstanceUID."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    config: Path | None = ConfigOption,
) -> None:
    """List jobs by state with their targets, tries and errors."""
    cfg = load(config).config
    store = JobStore.from_config(cfg, fsync=False)
    states = [s for s in STATES if not state or s in state]
    bad = [s for s in state if s not in STATES]
    if bad:
        raise die(f"unknown state(s) {', '.join(bad)}; choose from {', '.join(STATES)}")
    incoming = cfg.folder("incoming")
    if not state and incoming.is_dir():
        arriving = [p for p in incoming.iterdir() if not p.name.startswith(".")]
        if arriving and not as_json:
            typer.echo(f"incoming: {len(arriving)} series still arriving")
    if not state:
        show_controls(cfg, as_json)
    for st in states:
        # Jobs move on while we list them (a running router): sort and skip without failing.
        refs = sorted(store.list([st]), key=lambda r: -store.age(r))
        if not as_json:
            typer.echo(f"{st}: {len(refs)} job(s)")
        for ref in refs:
            try:
                task = store.read(ref)
                instances = len(instance_files(ref.path))
            except FileNotFoundError:
                if not ref.path.is_dir():
                    continue  # moved to another state since the listing
                instances = 0
                task = None
                problem = "task.json is missing"
            except (OSError, ValueError) as exc:
                task = None
                problem = f"task.json unreadable: {exc}"
            if task is None:
                if as_json:
                    typer.echo(json.dumps({"id": ref.id, "state": st, "error": problem}))
                else:
                    typer.echo(f"  {ref.id}  ({problem})")
                continue
            if series and task.info.uid != series:
                continue
            d = task.dispatch_state
            row = {
                "id": ref.id,
                "state": st,
                "series_uid": task.info.uid,
                "action": task.info.action,
                "targets": task.target_names,
                "retries": d.retries if d else None,
                "next_retry_at": d.next_retry_at if d else None,
                "error": task.error,
                "instances": instances,
            }
            processing = processing_summary(ref, task)
            if processing is not None:
                row["processing"] = processing
            if task.parent_id:
                row["parent_id"] = task.parent_id
            if as_json:
                typer.echo(json.dumps(row))
                continue
            extra = ""
            if processing is not None:
                extra += f"  [{' -> '.join(processing['modules'])}: {processing['state']}]"
            if d and d.retries:
                wait = max(0.0, float(d.next_retry_at or 0) - time.time())
                extra = f"  tries={d.retries} next in {wait:.0f}s"
            if task.error:
                extra += f"  error: {task.error.splitlines()[0]}"
            if processing is not None and processing.get("log_tail") and task.error:
                extra += f"  log: {processing['log_tail'].splitlines()[-1]}"
            typer.echo(
                f"  {ref.id}  {task.info.action:<12} -> {','.join(task.target_names) or '-':<16}"
                f" {row['instances']} inst  series {task.info.uid}{extra}"
            )


def show_controls(cfg: Config, as_json: bool) -> None:
    """Suspended services (HALT) and studies being collected, above the job list."""
    from mercure.controls import CONTROLLED, suspended_by

    for what in CONTROLLED:
        by = suspended_by(cfg, what)
        if by is None:
            continue
        if as_json:
            typer.echo(json.dumps({"suspended": what, **by}))
            continue
        since = by.get("since")
        when = "?"
        if isinstance(since, int | float):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(since)))
        reason = f": {by['reason']}" if by.get("reason") else ""
        typer.echo(f"{what}: SUSPENDED since {when} by {by.get('by', '?')}{reason} "
                   f"(`mercure resume {what}`)")  # fmt: skip
    studies = cfg.folder("studies")
    if studies.is_dir():
        collecting = [p for p in studies.iterdir() if not p.name.startswith(".") and p.is_dir()]
        if collecting and not as_json:
            typer.echo(f"studies: {len(collecting)} being collected (`mercure study list`)")


@job_app.command("show")
def show(
    task_id: str = typer.Argument(..., help="Job id (a unique prefix is enough)."),
    instances: bool = typer.Option(
        False, "--instances", help="List every delivered instance with its UID and digest."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the ledger's history as JSON."),
    config: Path | None = ConfigOption,
) -> None:
    """Show one job: its state, task file, who holds it, its notifications and its whole
    history from the ledger (also for a job the cleaner has removed)."""
    from mercure.outbox import Outbox
    from mercure.services.runtime import outbox_folder

    cfg = load(config).config
    store = JobStore.from_config(cfg, fsync=False)
    ref = store.find(task_id)
    if as_json:
        show_history_json(cfg, ref.id if ref else task_id)
        return
    if ref is None:
        if not show_history(cfg, task_id, instances=instances, missing_ok=False):
            raise die(f"no job '{task_id}' in any state folder or in the ledger")
        return
    typer.echo(f"job {ref.id}: {ref.state} ({ref.path})")
    typer.echo(f"instances: {len(instance_files(ref.path))}")
    owner = claim_owner(ref.path)
    if owner:
        held = " (held now)" if is_claimed(ref.path) else ""
        typer.echo(f"last claimed by: {owner}{held}")
    try:
        record = read_record(ref.path)
    except ValueError as exc:
        typer.echo(f"processing.json unreadable: {exc}")
        record = None
    if record is not None:
        show_processing(record)
    typer.echo((ref.path / "task.json").read_text())
    folder = outbox_folder(cfg)
    records = Outbox(folder, fsync=False).records(ref.id) if folder.is_dir() else []
    if records:
        typer.echo("notifications:")
    for record in records:
        note = record.get("notification", {})
        detail = record.get("detail") or "; ".join(record.get("errors", [])[-1:])
        typer.echo(
            f"  {note.get('event', '?'):<10} rule {note.get('rule_name', '?')} via "
            f"{record.get('notifier', '?')}: {record.get('outcome')}"
            f" after {record.get('tries', 0)} tr{'y' if record.get('tries') == 1 else 'ies'}"
            + (f" ({detail})" if detail else "")
        )
    show_history(cfg, ref.id, instances=instances, missing_ok=True)


def _history(cfg: Config, task_id: str) -> tuple[JobHistory | None, str]:
    """The ledger's history of a job (an id prefix is resolved), or None and why not."""
    from mercure.ledger import LedgerConfigError, LedgerSettings, LedgerUnavailable, open_queries

    if not LedgerSettings.of(cfg).enabled:
        return None, "the ledger is off"
    try:
        q = open_queries(cfg)
        ids = q.resolve(task_id)
        if len(ids) > 1:
            return None, f"'{task_id}' matches several jobs: {', '.join(ids)}"
        return (q.job(ids[0]) if ids else None), "the ledger has nothing about it yet"
    except (LedgerUnavailable, LedgerConfigError) as exc:
        return None, f"the ledger cannot be read: {exc}"


def show_history(cfg: Config, task_id: str, *, instances: bool, missing_ok: bool) -> bool:
    """Print the job's history from the ledger; False if there is none."""
    from mercure.cli.history import history_lines

    history, why = _history(cfg, task_id)
    if history is None:
        if missing_ok:
            typer.echo(f"history: {why}")
        else:
            typer.secho(why, err=True)
        return False
    job = history.job
    if not missing_ok:
        typer.echo(f"job {job['task_id']}: {job.get('state') or '?'} (only in the ledger now)")
    typer.echo("history (ledger):")
    for line in history_lines(history, instances=instances):
        typer.echo(line)
    return True


def show_history_json(cfg: Config, task_id: str) -> None:
    history, why = _history(cfg, task_id)
    if history is None:
        raise die(f"no history for job '{task_id}': {why}")
    typer.echo(json.dumps(history.to_json(), default=str, indent=2))


@job_app.command("retry")
def retry(
    task_id: str = typer.Argument(..., help="Job id in error/ (a unique prefix is enough)."),
    config: Path | None = ConfigOption,
) -> None:
    """Move a job from error/ back to outgoing/ with its tries reset; delivered files stay done."""
    loaded = load(config)
    runtime = build_runtime(loaded.config, loaded.plugins)
    try:
        outcome = retry_job(runtime, task_id, operator=_operator(), by="cli")
    except OperationError as exc:
        raise die(str(exc)) from None
    finally:
        runtime.close()
    typer.echo(outcome.message)


@job_app.command("discard")
def discard(
    task_id: str = typer.Argument(..., help="Job id in error/ (a unique prefix is enough)."),
    reason: str = typer.Option("", help="Why (kept in the task file and the event)."),
    config: Path | None = ConfigOption,
) -> None:
    """Give up on a job in error/: it moves to discard/ and is kept for the retention period."""
    loaded = load(config)
    runtime = build_runtime(loaded.config, loaded.plugins)
    try:
        outcome = discard_job(runtime, task_id, operator=_operator(), reason=reason, by="cli")
    except OperationError as exc:
        raise die(str(exc)) from None
    finally:
        runtime.close()
    typer.echo(outcome.message)


def processing_summary(ref: JobRef, task: Task) -> dict[str, Any] | None:
    """Module(s), state and log tail of a processing job, for ``mercure queue``."""
    processes = processes_of(task)
    if not processes or task.parent_id:
        return None
    try:
        record = read_record(ref.path)
    except ValueError as exc:
        return {"modules": [p.module_name for p in processes], "state": f"record unreadable: {exc}"}
    summary: dict[str, Any] = {"modules": [p.module_name for p in processes]}
    if record is None:
        summary["state"] = "waiting for a processor" if ref.state == "processing" else "not run"
        return summary
    state = record.describe()
    if ref.state == "processing" and record.phase == "running" and not is_claimed(ref.path):
        state += " (no processor holds it now)"
    summary.update(state=state, attempt=record.attempt, step=record.current)
    tails = [s.log_tail for s in record.steps if s.log_tail]
    if tails:
        summary["log_tail"] = tails[-1]
    return summary


def show_processing(record: ProcessingRecord) -> None:
    """The processing record as ``mercure job show`` prints it."""
    typer.echo(f"processing (attempt {record.attempt}): {record.describe()}")
    for i, step in enumerate(record.steps):
        parts = [step.state]
        if step.exit_code is not None:
            parts.append(f"exit code {step.exit_code}")
        if step.duration is not None:
            parts.append(f"{step.duration:.1f} s")
        if step.runner:
            parts.append(f"runner {step.runner}")
        if step.state == "done":
            parts.append(f"{step.outputs} DICOM output(s)")
        typer.echo(f"  step {i + 1} {step.module}: {', '.join(parts)}")
        if step.error:
            typer.echo(f"    {step.error}")
        if step.log_file:
            typer.echo(f"    log: {step.log_file}")
        if step.log_tail:
            typer.echo("    log tail:")
            for line in step.log_tail.splitlines():
                typer.echo(f"      {line}")
    if record.failure:
        typer.echo(f"  failure: {record.failure.splitlines()[0]}")
    if record.dispatch_job:
        typer.echo(f"  results sent on as job {record.dispatch_job}")
    for note in record.notes:
        typer.echo(f"  note: {note}")
