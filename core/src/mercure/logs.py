"""Logging through structlog: a console renderer on a terminal, JSON lines otherwise.

The standard library's loggers (pynetdicom's among them) go through the same renderer, so one
process writes one format. Bind ``task_id`` / ``series_uid`` with ``log.bind(...)``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import structlog

Format = Literal["auto", "console", "json"]
_configured = False


def configure_logging(level: str = "INFO", fmt: Format | None = None) -> None:
    """Set up structlog and the stdlib root logger once per process."""
    global _configured
    fmt = fmt or os.environ.get("MERCURE_LOG_FORMAT", "auto")  # type: ignore[assignment]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if not use_console else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO; keep its chatter at WARNING unless asked for.
    logging.getLogger("pynetdicom").setLevel(
        os.environ.get("MERCURE_PYNETDICOM_LOG_LEVEL", "WARNING").upper()
    )
    # httpx logs every request at INFO: plugins that poll (a Nomad runner, a DICOMweb target)
    # would drown the router's own lines.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(
            os.environ.get("MERCURE_HTTP_LOG_LEVEL", "WARNING").upper()
        )
    _configured = True


def _identity(logger: Any, name: str, event: Any) -> Any:
    return event


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A structlog logger with ``context`` bound."""
    log = structlog.get_logger(name)
    return log.bind(**context) if context else log
