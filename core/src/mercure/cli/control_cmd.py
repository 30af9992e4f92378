"""``mercure suspend`` / ``mercure resume``: mercure's HALT switch for dispatching, processing."""

from __future__ import annotations

from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.controls import CONTROLLED, Controlled, current_user
from mercure.operations import OperationError, resume_service, suspend_service
from mercure.services.runtime import build_runtime

WhatArgument = typer.Argument(
    ..., help="dispatching, processing, or all (both).", show_default=False
)


def install(app: typer.Typer) -> None:
    app.command("suspend")(suspend_cmd)
    app.command("resume")(resume_cmd)


def _which(what: str) -> list[Controlled]:
    if what == "all":
        return list(CONTROLLED)
    if what not in CONTROLLED:
        raise die(f"cannot suspend '{what}'; choose dispatching, processing or all")
    return [what]


def suspend_cmd(
    what: str = WhatArgument,
    reason: str = typer.Option("", help="Why (kept in the HALT file and the event)."),
    config: Path | None = ConfigOption,
) -> None:
    """Stop starting new deliveries or processing jobs (running ones finish); every
    dispatcher or processor on this spool obeys within one scan interval."""
    loaded = load(config)
    runtime = build_runtime(loaded.config, loaded.plugins)
    try:
        for name in _which(what):
            outcome = suspend_service(runtime, name, operator=current_user(), reason=reason)
            typer.echo(outcome.message)
    except OperationError as exc:
        raise die(str(exc)) from None
    finally:
        runtime.close()


def resume_cmd(what: str = WhatArgument, config: Path | None = ConfigOption) -> None:
    """Remove the HALT file: dispatching or processing goes on where it stopped."""
    loaded = load(config)
    runtime = build_runtime(loaded.config, loaded.plugins)
    try:
        for name in _which(what):
            typer.echo(resume_service(runtime, name, operator=current_user()).message)
    except OperationError as exc:
        raise die(str(exc)) from None
    finally:
        runtime.close()
