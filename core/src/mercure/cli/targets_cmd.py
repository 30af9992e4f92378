"""``mercure targets``: list configured targets and test their connection."""

from __future__ import annotations

from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.services.runtime import build_runtime
from mercure.targets import TargetError

app = typer.Typer(help="List and test the configured targets.", no_args_is_help=True)


@app.command("list")
def list_targets(config: Path | None = ConfigOption) -> None:
    """List configured targets with their type."""
    cfg = load(config).config
    for name, target in cfg.targets.items():
        typer.echo(f"{name}  {target.target_type}  {target.comment}".rstrip())


@app.command("test")
def test(
    name: str = typer.Argument(..., help="The target's name in the configuration."),
    config: Path | None = ConfigOption,
) -> None:
    """Check that a target answers (C-ECHO, TLS handshake, login, ...); one line, exit 1 if not."""
    loaded = load(config)
    if name not in loaded.config.targets:
        raise die(
            f"no target named '{name}' (targets: {', '.join(loaded.config.targets) or 'none'})"
        )
    runtime = build_runtime(loaded.config, loaded.plugins)
    try:
        outcome = runtime.target(name).test_connection()
    except TargetError as exc:
        raise die(f"{name}: FAILED: {exc}") from None
    except Exception as exc:
        raise die(f"{name}: FAILED: {exc.__class__.__name__}: {exc}") from None
    finally:
        runtime.close()
    typer.echo(f"{name}: OK: {outcome}")
