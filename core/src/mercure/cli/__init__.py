"""The ``mercure`` command line. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import sys

import typer

from mercure import __version__

app = typer.Typer(
    name="mercure",
    help="A plugin-based DICOM router: receive, route by rules, process, deliver.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _build() -> typer.Typer:
    from mercure.cli import (
        config_cmd,
        control_cmd,
        jobs_cmd,
        ledger_cmd,
        plugins_cmd,
        replay_cmd,
        rules_cmd,
        run_cmd,
        studies_cmd,
        targets_cmd,
    )

    run_cmd.install(app)
    plugins_cmd.install(app)
    app.add_typer(config_cmd.app, name="config")
    app.add_typer(rules_cmd.app, name="rules")
    app.add_typer(targets_cmd.app, name="targets")
    jobs_cmd.install(app)
    control_cmd.install(app)
    ledger_cmd.install(app)
    replay_cmd.install(rules_cmd.app)
    app.add_typer(studies_cmd.app, name="study")

    @app.command()
    def version() -> None:
        """Print the version of mercure-core."""
        typer.echo(__version__)

    try:
        from mercure.cli.context import find_config, plugin_manager_for

        # The same manager serves the command itself: plugins are loaded once per process.
        plugin_manager_for(find_config(None)).hook.register_commands(cli=app)
    except Exception as exc:  # a broken plugin must not take the CLI down with it
        typer.secho(f"warning: plugin commands not loaded: {exc}", err=True, fg="yellow")
    return app


def main() -> None:
    _build()
    app(prog_name="mercure")


if __name__ == "__main__":
    main()
    sys.exit(0)
