"""How every command finds its configuration and plugins."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import typer

from mercure.config import Config, ConfigError, default_config_data, load_config, validate_config
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.registry import PluginRegistrationError

ENV_CONFIG = "MERCURE_CONFIG"
ENV_DATA = "MERCURE_DATA"
DEFAULT_DATA = Path("mercure-data")

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="mercure.json to use. Default: $MERCURE_CONFIG, else ./mercure.json, else the built-in "
    "default (receive on 11112, route everything to a folder under --data).",
)
DataOption = typer.Option(
    None,
    "--data",
    help="Data folder for the built-in default configuration (default ./mercure-data).",
)


@dataclass
class Loaded:
    config: Config
    plugins: PluginManager
    source: str
    warnings: list[str]


def die(message: str, code: int = 1) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def find_config(path: Path | None) -> Path | None:
    if path is not None:
        return path
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    local = Path("mercure.json")
    return local if local.exists() else None


def _site_plugin_folder(config_path: Path | None) -> str | None:
    """The configuration's ``plugin_folder``, read before validation needs its plugins."""
    if config_path is None:
        return None
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_config reports the problem
    folder = raw.get("plugin_folder") if isinstance(raw, dict) else None
    return folder if isinstance(folder, str) and folder else None


_MANAGERS: dict[str | None, PluginManager] = {}


def plugin_manager_for(config_path: Path | None) -> PluginManager:
    """Entry-point plugins, the configuration's site plugins, then the built-ins (in that
    order, as docs/writing_plugins.md says), or exit with the plugin error.

    Built once per process and site folder: the CLI's plugin commands and the command that
    runs share it.
    """
    # Site plugins before validation: the configuration may use the types they register.
    site_folder = _site_plugin_folder(config_path)
    manager = _MANAGERS.get(site_folder)
    if manager is not None:
        return manager
    try:
        manager = build_plugin_manager(Path(site_folder) if site_folder else None)
    except PluginRegistrationError as exc:
        raise die(f"plugin error: {exc}") from None
    _MANAGERS[site_folder] = manager
    return manager


def load(path: Path | None, data: Path | None = None) -> Loaded:
    """Load plugins and the configuration, or exit with every error explained."""
    config_path = find_config(path)
    plugins = plugin_manager_for(config_path)
    try:
        registry = plugins.registry
        if config_path is None:
            folder = data or Path(os.environ.get(ENV_DATA, DEFAULT_DATA))
            config, warnings = validate_config(
                default_config_data(folder), registry, "(built-in default)"
            )
            source = f"built-in default (data in {folder.resolve()})"
        else:
            config, warnings = load_config(config_path, registry)
            source = str(config_path)
    except PluginRegistrationError as exc:
        raise die(f"plugin error: {exc}") from None
    except ConfigError as exc:
        raise die(str(exc)) from None
    return Loaded(config, plugins, source, warnings)
