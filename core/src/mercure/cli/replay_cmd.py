"""``mercure rules replay``: what a changed configuration would route differently."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.cli.history import parse_time, stamp
from mercure.config import ConfigError, load_config
from mercure.ledger import LedgerUnavailable


def install(app: typer.Typer) -> None:
    app.command("replay")(replay)


def replay(
    new_config: Path = typer.Argument(..., help="The changed mercure.json to try out."),
    since: str = typer.Option("7d", "--since", help="Series routed since: 7d, 12h or a date."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON report."),
    config: Path | None = ConfigOption,
) -> None:
    """Evaluate NEW_CONFIG's rules on the series the ledger recorded and print each series
    that would now be routed differently (new or lost targets, discarded, fallback,
    processing). Reads the ledger only; changes nothing on disk. Exit code 0 when nothing
    would change, 4 when something would."""
    from mercure.cli.ledger_cmd import open_queries
    from mercure.ledger.replay import replay as run_replay

    loaded = load(config)
    try:
        new, _ = load_config(new_config, loaded.plugins.registry)
    except ConfigError as exc:
        raise die(str(exc)) from None
    try:
        start = parse_time(since)
    except ValueError as exc:
        raise die(str(exc)) from None
    queries = open_queries(loaded.config)
    try:
        report = run_replay(queries, new, start)
    except LedgerUnavailable as exc:
        raise die(f"the ledger cannot be read: {exc}") from None
    finally:
        queries.db.close()
    if as_json:
        typer.echo(json.dumps({"since": start, **report.to_json()}, default=str, indent=2))
    else:
        typer.echo(
            f"{report.routings} recorded series routing(s) since {stamp(start)}; "
            f"{len(report.changed)} would change with {new_config}"
        )
        for c in report.changed:
            t = c.tags
            typer.echo(
                f"{stamp(c.received)}  series {c.series_uid}  {t.get('Modality', '')} "
                f"{t.get('SeriesDescription', '')}  patient {t.get('PatientID', '')} "
                f"acc {t.get('AccessionNumber', '')}"
            )
            typer.echo(
                f"    was: {', '.join(c.old.targets) or ('discarded' if c.old.discarded else '-')}"
                f"  now: {', '.join(c.new.targets) or ('discarded' if c.new.discarded else '-')}"
            )
            for change in c.changes:
                typer.echo(f"    {change}")
    raise typer.Exit(4 if report.changed else 0)
