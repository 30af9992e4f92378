"""mercure's web dashboard: the queue, a job's history, find, rules, targets and the
configuration at a glance, with the operator actions of the command line.

Adds the service type ``web`` (``plugins.services.web`` in ``mercure.json``, started by
``mercure run``) and the command ``mercure web`` (serve on its own, manage users).
"""

from __future__ import annotations

from typing import Any

from mercure import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_services(register: Any) -> None:
    from mercure_web_dashboard.service import WebService
    from mercure_web_dashboard.settings import WebSettings

    register("web", WebSettings, WebService)


@hookimpl
def register_commands(cli: Any) -> None:
    from mercure_web_dashboard.cli import web_app

    cli.add_typer(web_app, name="web")
