"""``mercure plugins``: what is installed and what each plugin provides."""

from __future__ import annotations

import json

import typer

from mercure.plugins import build_plugin_manager
from mercure.registry import PluginRegistrationError


def install(app: typer.Typer) -> None:
    @app.command()
    def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List every loaded plugin, its distribution and version, and the types it registers."""
        try:
            manager = build_plugin_manager()
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
