"""``mercure plugins``: what is installed and what each plugin provides."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, find_config, plugin_manager_for
from mercure.registry import PluginRegistrationError


def install(app: typer.Typer) -> None:
    @app.command()
    def plugins(
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        config: Path | None = ConfigOption,
    ) -> None:
        """List every loaded plugin (site plugins of the configuration's ``plugin_folder``
        included), its distribution and version, and the types it registers."""
        manager = plugin_manager_for(find_config(config))
        try:
            registry = manager.registry
        except PluginRegistrationError as exc:
            typer.secho(f"plugin error: {exc}", err=True, fg="red")
            raise typer.Exit(1) from None
        rows = []
        for name, info in sorted(manager.infos.items(), key=lambda kv: (kv[1].source, kv[0])):
            types = [f"{t.kind}:{t.name}" for t in registry if t.plugin == name]
            rows.append(
                {
                    "name": name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "source": info.source,
                    "types": types,
                }
            )
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        width = max(len(r["name"]) for r in rows)
        dwidth = max(len(f"{r['distribution']} {r['version']}") for r in rows)
        for r in rows:
            dist = f"{r['distribution']} {r['version']}".strip()
            typer.echo(
                f"{r['name']:<{width}}  {dist:<{dwidth}}  {r['source']:<11}  "
                f"{', '.join(r['types']) or '-'}"
            )
