"""``mercure run``: start the services."""

from __future__ import annotations

from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, DataOption, die, load
from mercure.logs import configure_logging, get_logger
from mercure.services.runtime import build_runtime
from mercure.services.supervisor import SERVICES, Supervisor


def install(app: typer.Typer) -> None:
    @app.command()
    def run(
        config: Path | None = ConfigOption,
        data: Path | None = DataOption,
        only: str | None = typer.Option(
            None,
            "--only",
            help="Comma-separated services to start in this process "
            f"({', '.join(SERVICES)}, or a plugin's service such as web), to run them as "
            "separate processes. Default: all of these and the configured plugin services.",
        ),
        port: int | None = typer.Option(None, help="Override the DICOM port of the configuration."),
    ) -> None:
        """Start the router: by default all services in this process, until SIGTERM or Ctrl-C."""
        loaded = load(config, data)
        cfg = loaded.config
        if port is not None:
            cfg = cfg.model_copy(update={"port": port})
        configure_logging(cfg.log_level)
        log = get_logger("mercure.run")
        for warning in loaded.warnings:
            log.warning("configuration warning", detail=warning)
        names = [s.strip() for s in only.split(",") if s.strip()] if only is not None else None
        for target in cfg.targets.values():
            folder = getattr(target, "folder", None)
            if loaded.source.startswith("built-in") and target.target_type == "folder" and folder:
                # The default's folder target must exist, or every job would wait in outgoing/.
                Path(folder).mkdir(parents=True, exist_ok=True)
        log.info(
            "configuration loaded",
            source=loaded.source,
            rules=len(cfg.rules),
            targets=len(cfg.targets),
        )
        try:
            watched = None if loaded.source.startswith("built-in") else Path(loaded.source)
            supervisor = Supervisor(
                build_runtime(cfg, loaded.plugins),
                names,
                config_path=watched,
                overrides={"port": port} if port is not None else None,
            )
        except ValueError as exc:
            raise die(str(exc)) from None
        try:
            supervisor.run_forever()
        except OSError as exc:
            raise die(f"cannot start: {exc}") from None
