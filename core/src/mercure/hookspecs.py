"""Every hook a plugin can implement, in one module.

Two kinds of hooks, like pynetdicom's notification and intervention events:

* **Registration hooks** (``register_*``) are called once when the plugin manager is built.
  Each receives a ``register`` callback; calling it adds a *type* (a target type such as
  ``"xnat"``, a runner type, ...) with its pydantic configuration model and the class that
  implements it. Sending a job to a target is then a direct call on that one class, not a
  broadcast.
* **Observer hooks** (``on_*``) are broadcast to every plugin that implements them. An
  observer that raises is logged and ignored: a failing observer never fails a job.

Plugins implement hooks with ``from mercure import hookimpl``. Every hook here is documented
in ``docs/plugin_hooks.md``; a test keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mercure import hookspec

if TYPE_CHECKING:
    import typer

    from mercure.events import TaskEvent
    from mercure.registry import RegisterFn


@hookspec
def register_targets(register: RegisterFn) -> None:
    """Add target types (where jobs are delivered).

    Called once per plugin manager. Call ``register(type_name, ConfigModel, Implementation)``
    for each type: ``ConfigModel`` subclasses :class:`mercure.targets.TargetConfig` with a field
    ``target_type: Literal["<type_name>"]``; ``Implementation`` subclasses
    :class:`mercure.targets.Target`. A type name registered twice is an error that names both
    distributions.
    """


@hookspec
def register_receivers(register: RegisterFn) -> None:
    """Add receiver types (how instances arrive: DICOM C-STORE, DICOMweb STOW, ...).

    ``register(type_name, ConfigModel | None, Implementation)``; ``Implementation`` subclasses
    :class:`mercure.receivers.Receiver`. The built-in ``dicom`` receiver is configured by
    mercure's top-level ``port`` and ``dicom_receiver`` settings.
    """


@hookspec
def register_runners(register: RegisterFn) -> None:
    """Add processing-runner types (how processing modules run: docker, nomad, local).

    ``register(type_name, ConfigModel | None, Implementation)``; ``Implementation`` subclasses
    :class:`mercure.runners.Runner`. The configured ``process_runner`` selects one.
    """


@hookspec
def register_notifiers(register: RegisterFn) -> None:
    """Add notifier types (webhook, e-mail, ...), told about reception, completion and errors.

    ``register(type_name, ConfigModel | None, Implementation)``; ``Implementation`` subclasses
    :class:`mercure.notifiers.Notifier`.
    """


@hookspec
def register_metrics_sinks(register: RegisterFn) -> None:
    """Add metrics-sink types (InfluxDB, Graphite, ...).

    ``register(type_name, ConfigModel | None, Implementation)``; ``Implementation`` subclasses
    :class:`mercure.metrics.MetricsSink`.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add commands or sub-apps to the ``mercure`` command line.

    Called once when the CLI starts, with the root :class:`typer.Typer` app. Add a group with
    ``cli.add_typer(sub_app, name="xnat")`` or a command with ``@cli.command()``.
    """


@hookspec
def on_task_event(event: TaskEvent) -> None:
    """Observe a job's life: received, routed, delivered, failed, discarded, retried.

    Broadcast to every implementation, in the process that made the change, after the change
    is durable on disk. Must return quickly (queue slow work); exceptions are logged and
    ignored.
    """


@hookspec
def on_startup(config: Any, services: list[str]) -> None:
    """Observe a ``mercure run`` start, after the configuration loaded and before services run.

    ``config`` is the loaded :class:`mercure.config.Config`; ``services`` the names of the
    services this process starts. Exceptions are logged and ignored.
    """
