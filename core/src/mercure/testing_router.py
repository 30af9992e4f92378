"""Routers, dispatchers and outboxes for tests: configurations, in-process routers, events."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercure import hookimpl
from mercure.config import Config, validate_config
from mercure.events import TaskEvent, TaskEventType
from mercure.jobs.store import State
from mercure.plugins import PluginManager, build_plugin_manager
from mercure.testing_peers import PeerProcess as PeerProcess
from mercure.testing_peers import port_accepts as port_accepts
from mercure.testing_postgres import PostgresServer as PostgresServer
from mercure.testing_ssh import OpenSSHServer as OpenSSHServer
from mercure.testing_ssh import SSHAccount as SSHAccount
from mercure.testing_ssh import processes_containing as processes_containing

if TYPE_CHECKING:
    from mercure.jobs.store import JobRef
    from mercure.jobs.task import Task
    from mercure.services.dispatcher import Dispatcher
    from mercure.services.runtime import Runtime

from mercure.testing_peers import wait_for


def config_for(tmp_path: Path, **overrides: Any) -> Config:
    """A configuration whose spool folders are under ``tmp_path``, validated with built-ins."""
    data: dict[str, Any] = {
        f"{name}_folder": str(tmp_path / "spool" / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    data.update(
        port=0,
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        retry_delay=1,
        retry_max=3,
    )
    registry = overrides.pop("_registry", None) or build_plugin_manager(autoload=True).registry
    data.update(overrides)
    config, _ = validate_config(data, registry)
    return config


@dataclass
class RunningRouter:
    """A router running in this process; ``port`` is its DICOM port."""

    config: Config
    supervisor: Any
    port: int

    def jobs(self, state: State = "success") -> int:
        """How many jobs are in ``state`` (``success``, ``error``, ``outgoing``, ...) now."""
        return sum(1 for _ in self.supervisor.runtime.store.list([state]))


def _run(config: Config, plugins: PluginManager | None = None) -> Iterator[RunningRouter]:
    from mercure.services.runtime import build_runtime
    from mercure.services.supervisor import Supervisor

    manager = plugins or build_plugin_manager()
    supervisor = Supervisor(build_runtime(config, manager))
    supervisor.start()
    port = supervisor.receivers[0].port if supervisor.receivers else 0
    try:
        yield RunningRouter(config, supervisor, port)
    finally:
        supervisor.stop()


def start_router(config: Config, plugins: PluginManager | None = None) -> Iterator[RunningRouter]:
    """Generator form of ``running_router`` for custom configurations (use with ``yield from``
    or ``contextlib.contextmanager``); ``plugins``: a manager with test plugins registered."""
    yield from _run(config, plugins)


class EventRecorder:
    """An ``on_task_event`` observer that keeps every event.

    Register it on the manager given to :func:`start_router`:
    ``manager = build_plugin_manager(); manager.register(EventRecorder(), "events")``.
    """

    def __init__(self) -> None:
        self._events: list[TaskEvent] = []
        self._lock = threading.Lock()

    @hookimpl
    def on_task_event(self, event: TaskEvent) -> None:
        with self._lock:
            self._events.append(event)

    def events(self, *types: TaskEventType) -> list[TaskEvent]:
        """The events so far, in order; only those of ``types`` if any are given."""
        with self._lock:
            return [e for e in self._events if not types or e.type in types]

    def wait(self, *types: TaskEventType, count: int = 1, timeout: float = 30.0) -> list[TaskEvent]:
        """Wait until at least ``count`` events of ``types`` were seen; return them all.

        Events follow the durable change they report, so a test that saw the change (a file,
        an outbox record) waits here for its event.
        """
        names = ", ".join(t.value for t in types) or "any"
        found: list[TaskEvent] = wait_for(
            lambda: (lambda seen: seen if len(seen) >= count else None)(self.events(*types)),
            timeout=timeout,
            what=f"{count} task event(s) of type {names}",
        )
        return found


def outbox_records(config: Config) -> list[dict[str, Any]]:
    """Every finished notification record (delivered or given up), in order of finishing."""
    from mercure.services.runtime import outbox_folder

    done = outbox_folder(config) / "done"
    records = []
    for path in done.glob("*/*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now; the next poll sees it
    return sorted(records, key=lambda r: float(r.get("finished_at", 0)))


def wait_for_notifications(
    config: Config, count: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Wait until the outbox has ``count`` finished records and nothing pending; return them."""
    from mercure.outbox import Outbox
    from mercure.services.runtime import outbox_folder

    outbox = Outbox(outbox_folder(config), fsync=False)

    def finished() -> list[dict[str, Any]] | None:
        records = outbox_records(config)
        return records if len(records) >= count and outbox.count() == 0 else None

    found: list[dict[str, Any]] = wait_for(
        finished, timeout=timeout, what=f"{count} finished notifications in the outbox"
    )
    return found


class DispatchEnv:
    """A runtime and the core's Dispatcher over a spool in ``tmp_path``; jobs made by hand.

    Retries are due at once (``retry_delay`` 0) and each :meth:`deliver` is one synchronous
    delivery attempt, so a test follows a job try by try without waiting.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runtime: Runtime | None = None
        self.dispatcher: Dispatcher | None = None

    def start(self, targets: dict[str, Any], **overrides: Any) -> DispatchEnv:
        """(Re)build the runtime with these targets; jobs already in the spool stay."""
        from mercure.services.dispatcher import Dispatcher
        from mercure.services.runtime import build_runtime

        self.close()
        overrides.setdefault("retry_delay", 0)
        overrides.setdefault("retry_max", 5)
        name = next(iter(targets))
        config = config_for(
            self.tmp_path,
            targets=targets,
            rules={"all": {"rule": "True", "target": name}},
            **overrides,
        )
        self.runtime = build_runtime(config, build_plugin_manager(), fsync=False)
        self.dispatcher = Dispatcher(self.runtime)
        return self

    def job(self, files: list[Path], target: str, tags: dict[str, str] | None = None) -> JobRef:
        """A job in ``outgoing/`` holding ``files`` for ``target``, as the router makes it."""
        from mercure.jobs.task import Task, TaskDispatch, TaskInfo

        assert self.runtime is not None, "call start() first"
        tags = dict(tags or {})
        series_uid = tags.get("SeriesInstanceUID", "1.2.3")
        task = Task(
            info=TaskInfo(
                action="route",
                uid=series_uid,
                triggered_rules={"all": True},
                applied_rule="all",
                sender_address=tags.get("SenderAddress", "MISSING"),
            ),
            id=str(uuid.uuid4()),
            dispatch=TaskDispatch(target_name=target, series_uid=series_uid),
            tags=tags,
            created_at=time.time(),
        )
        return self.runtime.store.create("outgoing", task, files)

    def where(self, ref: JobRef) -> JobRef:
        """The job's current place (it moves between states)."""
        assert self.runtime is not None, "call start() first"
        found = self.runtime.store.find_exact(ref.id)
        assert found is not None, f"job {ref.id} vanished"
        return found

    def deliver(self, ref: JobRef) -> tuple[JobRef, Task]:
        """One delivery attempt; return the job's new place and its task file."""
        assert self.runtime is not None and self.dispatcher is not None, "call start() first"
        self.dispatcher.deliver(self.where(ref))
        current = self.where(ref)
        return current, self.runtime.store.read(current)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.close()
            self.dispatcher = None
        if self.runtime is not None:
            self.runtime.close()  # the targets' close()
            self.runtime = None


@contextlib.contextmanager
def folder_router(
    tmp_path: Path, *, manager: PluginManager | None = None, **overrides: Any
) -> Iterator[RunningRouter]:
    """A router on 127.0.0.1 whose rule ``all`` sends everything to the folder target ``folder``
    (``tmp_path / "target"``); ``overrides`` are configuration fields (``plugins={...}``),
    ``manager`` a plugin manager with test plugins registered."""
    target = tmp_path / "target"
    target.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("dicom_receiver", {"bind_address": "127.0.0.1"})
    if manager is not None:
        overrides.setdefault("_registry", manager.registry)
    config = config_for(
        tmp_path,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        **overrides,
    )
    gen = start_router(config, manager)
    running = next(gen)
    try:
        yield running
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
