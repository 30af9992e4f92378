"""``mercure events``, ``mercure find``, ``mercure ledger status``: questions to the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.cli.history import parse_time, stamp
from mercure.config import Config
from mercure.ledger import LedgerConfigError, LedgerQueries, LedgerSettings, LedgerUnavailable
from mercure.ledger import open_queries as _open

ledger_app = typer.Typer(help="The delivery ledger: state of its queue and database.")

SinceOption = typer.Option(None, "--since", help="From this time: 7d, 12h, 30m or a date.")
UntilOption = typer.Option(None, "--until", help="Up to this time: 1h (ago) or a date.")


def install(app: typer.Typer) -> None:
    app.command("events")(events)
    app.command("find")(find)
    app.add_typer(ledger_app, name="ledger")


def open_queries(config: Config) -> LedgerQueries:
    """The ledger of ``config``, or exit saying why it cannot be read."""
    try:
        return _open(config)
    except (LedgerUnavailable, LedgerConfigError) as exc:
        raise die(f"the ledger cannot be read: {exc}") from None


def _time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise die(str(exc)) from None


def _dump(rows: object) -> str:
    return json.dumps(rows, default=str)


def events(
    task: str | None = typer.Option(None, "--task", "-t", help="Only this job's events."),
    series: str | None = typer.Option(None, "--series", help="Only this SeriesInstanceUID."),
    kind: list[str] = typer.Option([], "--type", help="Only these event types (route, ...)."),
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    limit: int = typer.Option(100, "--limit", "-n", help="The newest N events."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    config: Path | None = ConfigOption,
) -> None:
    """List the ledger's events, oldest first (the newest --limit of them)."""
    q = open_queries(load(config).config)
    if task:
        ids = q.resolve(task)
        task = ids[0] if len(ids) == 1 else task
    try:
        rows = q.events(
            task_id=task,
            series_uid=series,
            types=kind or None,
            since=_time(since),
            until=_time(until),
            limit=limit,
        )
    except LedgerUnavailable as exc:
        raise die(f"the ledger cannot be read: {exc}") from None
    for row in rows:
        if as_json:
            typer.echo(_dump(row))
            continue
        who = row["task_id"] or row["service"]
        text = " ".join(str(v) for v in (row["target"], row["info"]) if v)
        typer.echo(f"{stamp(row['time'])}  {row['type']:<14} {who}  {text}".rstrip())


def find(
    patient_id: str | None = typer.Option(None, "--patient-id", "--mrn", help="PatientID."),
    accession: str | None = typer.Option(None, "--accession", "--acc", help="AccessionNumber."),
    study: str | None = typer.Option(None, "--study", help="StudyInstanceUID."),
    series: str | None = typer.Option(None, "--series", help="SeriesInstanceUID."),
    sop: str | None = typer.Option(None, "--sop", help="SOPInstanceUID of one instance."),
    task: str | None = typer.Option(None, "--task", "-t", help="A job id or its prefix."),
    since: str | None = SinceOption,
    until: str | None = UntilOption,
    limit: int = typer.Option(200, "--limit", "-n"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    config: Path | None = ConfigOption,
) -> None:
    """Find jobs: where did this patient's, accession's, study's or instance's images go?"""
    if not any((patient_id, accession, study, series, sop, task, since, until)):
        raise die(
            "say what to look for: --patient-id, --accession, --study, --series, --sop, "
            "--task, --since or --until"
        )
    q = open_queries(load(config).config)
    try:
        rows = q.find(
            patient_id=patient_id,
            accession=accession,
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            task_id=task,
            since=_time(since),
            until=_time(until),
            limit=limit,
        )
    except LedgerUnavailable as exc:
        raise die(f"the ledger cannot be read: {exc}") from None
    if as_json:
        for row in rows:
            typer.echo(_dump(row))
        return
    if not rows:
        typer.echo("no job found")
        raise typer.Exit(3)
    for r in rows:
        typer.echo(
            f"{stamp(r['created'])}  {r['task_id']}  {r['action']:<12} -> {r['targets'] or '-':<16}"
            f" {r['state']:<10} {r['delivered']}/{r['instances']} delivered  "
            f"{r.get('modality') or ''} {r.get('series_description') or ''}  "
            f"patient {r['patient_id']} acc {r['accession']}"
        )
        if r["error"]:
            typer.echo(f"    error: {str(r['error']).splitlines()[0]}")


@ledger_app.command("status")
def status(config: Path | None = ConfigOption) -> None:
    """Where the ledger is, its schema, its rows, and how far behind the queue it is."""
    from mercure.ledger.queue import EventQueue
    from mercure.ledger.schema import current_version
    from mercure.ledger.writer import stored_cursor

    cfg = load(config).config
    settings = LedgerSettings.of(cfg)
    typer.echo(f"queue: {settings.queue_folder}")
    if not settings.queue_folder.is_dir():
        typer.echo("  no queue yet (the router has not run with this configuration)")
        queue = None
    else:
        queue = EventQueue(settings.queue_folder, fsync=False)
        typer.echo(f"  id {queue.queue_id}, segments {len(queue.segments())}")
        for reader in queue.readers():
            position = queue.cursor(reader)
            if position is not None:
                typer.echo(f"  reader {reader}: {queue.backlog(position)} bytes behind")
    if not settings.enabled:
        typer.echo("database: off")
        return
    q = open_queries(cfg)
    try:
        typer.echo(f"database: {q.db.describe()}, schema version {current_version(q.db)}")
        for table, count in q.counts().items():
            typer.echo(f"  {table}: {count}")
        if queue is not None:
            cursor = stored_cursor(q.db, queue.queue_id)
            if cursor is not None:
                typer.echo(f"  written from this queue up to {cursor.to_json()}")
    except LedgerUnavailable as exc:
        raise die(f"the ledger cannot be read: {exc}") from None
