"""``mercure config``: check a configuration, write a default one."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mercure.cli.context import die, load
from mercure.config import default_config_data

app = typer.Typer(help="Check or create a mercure.json configuration.", no_args_is_help=True)


@app.command("check")
def check(path: Path = typer.Argument(..., help="The mercure.json to check.")) -> None:
    """Validate a configuration; report every error with its JSON path. Exit 1 if invalid."""
    # The same loading as every other command, so site plugins (plugin_folder) count too.
    loaded = load(path)
    config, warnings = loaded.config, loaded.warnings
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg="yellow")
    typer.echo(
        f"{path}: valid ({len(config.targets)} targets, {len(config.rules)} rules, "
        f"{len(config.modules)} modules)"
    )


@app.command("init")
def init(
    path: Path = typer.Argument(Path("mercure.json"), help="Where to write the configuration."),
    data: Path = typer.Option(Path("mercure-data"), help="Data folder for the spool folders."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
) -> None:
    """Write a working configuration: receive on 11112, route everything to a folder target."""
    if path.exists() and not force:
        raise die(f"{path} exists; use --force to overwrite it")
    path.write_text(json.dumps(default_config_data(data), indent=2) + "\n")
    typer.echo(f"wrote {path} (data folder {data.resolve()})")
