"""``mercure web``: serve the dashboard on its own, and manage its users file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from mercure.cli.context import ConfigOption, die, load
from mercure.logs import configure_logging
from mercure.services.runtime import build_runtime

from mercure_web_dashboard.settings import ROLES, Role, web_settings
from mercure_web_dashboard.users import UsersFile, UsersFileError

web_app = typer.Typer(
    help="The web dashboard: `mercure web` serves it (127.0.0.1:8000 by default); "
    "`mercure web user ...` manages who may log in.",
    invoke_without_command=True,
)
user_app = typer.Typer(
    help="Users of the dashboard (argon2 password hashes).", no_args_is_help=True
)
web_app.add_typer(user_app, name="user")


@web_app.callback()
def serve(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default 8000)."),
    config: Path | None = ConfigOption,
) -> None:
    """Serve the dashboard in the foreground until Ctrl-C, from the configuration's
    ``plugins.services.web`` settings (or their defaults)."""
    if ctx.invoked_subcommand is not None:
        return
    from mercure_web_dashboard.server import WebServer

    loaded = load(config)
    settings = web_settings(loaded.config)
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = settings.model_copy(update=update)
    configure_logging(loaded.config.log_level)
    users = UsersFile(settings.users_path(loaded.config))
    try:
        if not users.users() and not settings.trusted_header:
            typer.secho(
                f"warning: no users in {users.path}: nobody can log in. Add one with "
                "`mercure web user add NAME --role operator`.",
                err=True,
                fg="yellow",
            )
    except UsersFileError as exc:
        raise die(str(exc)) from None
    runtime = build_runtime(loaded.config, loaded.plugins)
    server = WebServer(runtime, settings, source=loaded.source)
    try:
        server.run_forever()
    except (OSError, RuntimeError) as exc:
        raise die(str(exc)) from None
    finally:
        runtime.close()


def _users(config: Path | None) -> UsersFile:
    loaded = load(config)
    return UsersFile(web_settings(loaded.config).users_path(loaded.config))


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = typer.prompt("password", hide_input=True)
    second = typer.prompt("again", hide_input=True)
    if first != second:
        raise die("the two passwords differ; nothing was changed")
    return str(first)


@user_app.command("add")
def add(
    name: str = typer.Argument(..., help="The user name to log in with."),
    role: str = typer.Option("viewer", help="viewer (looks) or operator (also acts)."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Add a user, or set an existing user's password and role."""
    if role not in ROLES:
        raise die(f"role '{role}' is not one of {', '.join(ROLES)}")
    users = _users(config)
    try:
        user = users.set_password(name, _password(password_stdin), role_of(role))
    except UsersFileError as exc:
        raise die(str(exc)) from None
    typer.echo(f"user {user.name} ({user.role}) saved in {users.path}")


def role_of(value: str) -> Role:
    return "operator" if value == "operator" else "viewer"


@user_app.command("passwd")
def passwd(
    name: str = typer.Argument(...),
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    config: Path | None = ConfigOption,
) -> None:
    """Set a user's password (the role stays)."""
    users = _users(config)
    try:
        if users.get(name) is None:
            raise die(f"no user '{name}' in {users.path}; add one with `mercure web user add`")
        user = users.set_password(name, _password(password_stdin))
    except UsersFileError as exc:
        raise die(str(exc)) from None
    typer.echo(f"password of {user.name} changed")


@user_app.command("remove")
def remove(name: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """Remove a user; their sessions end at their next request."""
    users = _users(config)
    try:
        if not users.remove(name):
            raise die(f"no user '{name}' in {users.path}")
    except UsersFileError as exc:
        raise die(str(exc)) from None
    typer.echo(f"user {name} removed")


@user_app.command("list")
def list_users(config: Path | None = ConfigOption) -> None:
    """The users and their roles."""
    users = _users(config)
    try:
        found = users.users()
    except UsersFileError as exc:
        raise die(str(exc)) from None
    if not found:
        typer.echo(f"no users in {users.path}")
    for user in found.values():
        typer.echo(f"{user.name}  {user.role}")


__all__ = ["web_app"]
