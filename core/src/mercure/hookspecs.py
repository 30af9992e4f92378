"""Every hook a plugin can implement, in one module: the single source of the hook reference.

Two kinds of hooks, like pynetdicom's notification and intervention events:

* **Registration hooks** (``register_*``) are called once when the plugin manager builds its
  registry. Each receives a ``register`` callback; calling it adds a *type* (a target type
  such as ``"xnat"``, a runner type, ...) with its pydantic settings model and the class that
  implements it. Sending a job to a target is then a direct call on that one class, not a
  broadcast.
* **Observer hooks** (``on_*``) are broadcast to every plugin that implements them. An
  observer that raises is logged and the others are still called: a failing observer never
  fails a job.

Plugins implement hooks with ``from mercure import hookimpl``. The reference part of
``docs/plugin_hooks.md`` is generated from these docstrings (``python -m mercure.hookdoc``),
and a test fails when the two differ.
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
    """Add target types: where jobs are delivered (DICOM, DICOMweb, S3, SFTP, a folder, ...).

    - **Called** once per plugin manager, in every process that builds one (``mercure run``,
      each receiver process, every CLI command), on the calling thread, when the registry is
      first used.
    - **Arguments**: ``register(type_name, ConfigModel, Implementation)``. ``ConfigModel``
      subclasses ``mercure.targets.TargetConfig`` and declares
      ``target_type: Literal["<type_name>"] = "<type_name>"``; ``Implementation`` subclasses
      ``mercure.targets.Target``.
    - **Returns** nothing.
    - **Then**: a configured target of the type is validated with ``ConfigModel`` when the
      configuration loads. The dispatcher creates one ``Implementation(name, config,
      context)`` per configured target and process, calls ``send(job)`` from several
      dispatcher threads at once (one job each), and ``close()`` at shutdown;
      ``mercure targets test NAME`` calls ``test_connection()``.
    - **Exceptions**: ``PluginRegistrationError`` from ``register`` (duplicate type name,
      wrong model) stops the command with the reason; any other exception propagates too.
    """


@hookspec
def register_receivers(register: RegisterFn) -> None:
    """Add receiver types: how instances arrive (DICOM C-STORE, DICOMweb STOW-RS, a folder).

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``SettingsModel`` subclasses ``mercure.plugin_settings.PluginSettings``;
      ``Implementation`` subclasses ``mercure.receivers.Receiver``.
    - **Returns** nothing.
    - **Then**: the ``receiver`` service of ``mercure run`` creates each instance configured
      under ``plugins.receivers`` as ``Implementation(name, settings, context)`` (the context
      holds the incoming ``spool``), calls ``start()`` in the main thread, which must return
      once it accepts instances (serve from threads of its own), and ``stop()`` at shutdown.
      Only after ``spool.store(...)`` returned may a receiver tell the sender an instance is
      safe. The built-in ``dicom`` receiver is configured by mercure's ``port`` and
      ``dicom_receiver`` instead.
    - **Exceptions**: as for ``register_targets``; an exception from ``start()`` stops
      ``mercure run`` with the reason.
    """


@hookspec
def register_runners(register: RegisterFn) -> None:
    """Add processing-runner types: how processing modules run (local, docker, nomad).

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``Implementation`` subclasses ``mercure.runners.Runner``.
    - **Returns** nothing.
    - **Then**: ``process_runner`` names the runner instance (empty: the built-in ``local``
      runner, which exists unconfigured); its settings are validated with ``SettingsModel``
      and ``Runner.check_module`` is asked about every module when the configuration loads.
      The processor creates the instance once per process (``Implementation(name, settings,
      context)``), calls ``start()``, then ``launch(run)`` / ``wait(handle, timeout)`` /
      ``cancel(handle)`` / ``cleanup(handle)`` from its threads (several runs at once), and
      ``close()`` at shutdown, which must leave running modules running. ``launch`` must be
      idempotent per ``run.run_id`` and a handle must be usable by another process: see the
      runner contract in ``docs/processing.md``.
    - **Exceptions**: ``RunnerError`` from ``launch`` fails that job's step with the message
      (``RunnerUnavailable``: launched again later, for up to ``LAUNCH_PATIENCE``); from
      ``wait`` it is logged and asked again until the module's timeout; registration errors
      as for ``register_targets``.
    """


@hookspec
def register_notifiers(register: RegisterFn) -> None:
    """Add notifier types (webhook, e-mail, ...): how people hear about a job.

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``Implementation`` subclasses ``mercure.notifiers.Notifier``.
    - **Returns** nothing.
    - **Then**: each configured instance (mercure's rule fields and ``plugins.notifiers``) is
      created once per process. The router and dispatcher call only its quick
      ``wants(notification)`` and queue the rendered notification in the durable outbox; the
      ``notifier`` service calls ``start()`` before the first ``send(notification)``, sends
      from its own thread, retries with backoff and records the outcome; ``close()`` at
      shutdown. A notification whose part could not be rendered (``problem(notification)``,
      by default any part's; override it to name the part you send) is given up untried.
    - **Exceptions**: from ``send``, ``PermanentNotificationError`` gives up at once, any
      other exception is retried; neither reaches a job.
    """


@hookspec
def register_metrics_sinks(register: RegisterFn) -> None:
    """Add metrics-sink types (InfluxDB, Graphite, Prometheus, ...).

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``Implementation`` subclasses ``mercure.metrics.MetricsSink``.
    - **Returns** nothing.
    - **Then**: each configured instance (mercure's ``graphite_*`` / ``influxdb_*`` fields
      and ``plugins.metrics_sinks``) is created and started once per ``mercure run`` process;
      ``send(batch)`` runs on the sink's own thread with batches from a bounded buffer;
      ``close()`` at shutdown.
    - **Exceptions**: an exception from ``send`` drops that batch (counted, logged at most
      once a minute); one from ``start()`` leaves the sink out. Neither delays the pipeline.
    """


@hookspec
def register_monitors(register: RegisterFn) -> None:
    """Add monitor types: forwarders of the ledger's records to an outside system (mercure's
    bookkeeper, an audit log, a message bus).

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``Implementation`` subclasses ``mercure.monitors.Monitor``.
    - **Returns** nothing.
    - **Then**: each instance configured under ``plugins.monitors`` (the ``bookkeeper`` type
      also by mercure's ``bookkeeper_api_key`` and ``bookkeeper`` fields) is created once by
      the ``ledger`` service, which calls ``start()``, then ``send(record)`` with every
      record of the durable ledger queue, one at a time and in order, on the instance's own
      thread, and ``close()`` at shutdown. Each instance keeps its own position in the queue,
      so a monitor that is down receives its records later and none is lost.
    - **Exceptions**: from ``send``, ``PermanentMonitorError`` skips that record (logged);
      any other exception sends the same record again after a backoff. Neither reaches a job.
    """


@hookspec
def register_services(register: RegisterFn) -> None:
    """Add service types: long-running parts of ``mercure run`` beside the core services (a
    web dashboard, an API).

    - **Called** once per plugin manager, when its registry is first used.
    - **Arguments**: ``register(type_name, SettingsModel, Implementation)``;
      ``Implementation`` subclasses ``mercure.plugin_services.PluginService``.
    - **Returns** nothing.
    - **Then**: ``mercure run`` creates each instance configured under ``plugins.services``
      (and, with ``--only NAME``, an unconfigured type with its default settings) as
      ``Implementation(name, settings, context)``, where the context also carries the
      process's runtime (configuration, job store, plugins, event fan-out); it calls
      ``start()`` on the main thread after the core services started, which must return
      once the service serves (from threads of its own), and ``close()`` at shutdown.
    - **Exceptions**: an exception from ``start()`` stops ``mercure run`` with the reason;
      registration errors as for ``register_targets``.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add commands or sub-apps to the ``mercure`` command line.

    - **Called** once when the ``mercure`` command starts, in that process, before arguments
      are parsed.
    - **Arguments**: ``cli``, the root ``typer.Typer`` app: add a group with
      ``cli.add_typer(sub_app, name="xnat")`` or a command with ``@cli.command()``.
    - **Returns** nothing.
    - **Exceptions**: ``mercure`` prints ``warning: plugin commands not loaded: ...`` and runs
      without plugin commands.
    """


@hookspec
def on_task_event(event: TaskEvent) -> None:
    """Observe a job's life: received, routed, delivered, failed, discarded, retried, notified.

    - **Called** for every ``mercure.events.TaskEvent``, in the process and on the thread of
      the service that made the change (router, dispatcher, processor, notifier, CLI), after
      the change is durable on disk; from several threads at once.
    - **Arguments**: ``event`` (type, task id, series UID, target, file count, rule, tags,
      time, extra). Processing adds the types ``process_begin``, ``process_module_begin``,
      ``process_module_complete``, ``process_complete`` and ``process_fail``: ``target`` is
      the module, ``extra`` has ``duration``, ``exit_code`` and ``step``. Study jobs add
      ``study_collect`` (a series added to a study being collected: ``task_id`` is the
      study job's, ``series_uid`` the series', ``extra`` has ``study_uid`` and ``started``),
      ``study_release`` (the study became a job: ``info`` says why, ``extra`` has
      ``study_uid``, ``series`` and ``state``) and ``study_force`` (``mercure study
      complete``). Operator commands add ``manual_discard`` (``mercure job discard``),
      ``suspend`` and ``resume`` (``mercure suspend``/``resume``: they concern a service,
      not a job, so ``task_id`` is empty and ``extra["service"]`` names it).
    - **Returns** nothing; must return quickly (queue slow work of your own).
    - **Exceptions**: logged (``observer failed``) and ignored; the other observers are still
      called.
    """


@hookspec
def on_startup(config: Any, services: list[str]) -> None:
    """Observe a ``mercure run`` start, after the configuration loaded and before services run.

    - **Called** once per ``mercure run`` process (and per receiver process), on the main
      thread.
    - **Arguments**: ``config``, the loaded ``mercure.config.Config``; ``services``, the names
      of the services this process starts.
    - **Returns** nothing.
    - **Exceptions**: logged and ignored.
    """
