"""The contract between the dispatcher and a target plugin.

A target plugin registers a configuration model (a subclass of :class:`TargetConfig` with a
``target_type`` literal) and an implementation (a subclass of :class:`Target`). The dispatcher
creates one implementation object per configured target and calls :meth:`Target.send` with
the instances of one job that are not yet delivered; whatever :meth:`Target.send` reports as
delivered is written to the job's task file, so a retry sends only what is still missing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from mercure.lifecycle import PluginContext

if TYPE_CHECKING:
    from mercure.instances import InstanceIndex
    from mercure.jobs.task import Task
    from mercure.patterns import TagPattern


class TargetConfig(BaseModel):
    """Fields every mercure target has; plugins add theirs and a ``target_type`` literal."""

    model_config = ConfigDict(extra="forbid")

    contact: str | None = ""
    comment: str = ""
    direction: Literal["push", "pull", "both"] = "push"
    """mercure 0.4: whether the router sends to (push) or queries (pull) this node."""
    # Set by each subclass as ``target_type: Literal["name"] = "name"``.
    target_type: str


class TargetError(Exception):
    """Delivery failed for a reason worth retrying (peer down, refused, timed out).

    The message is stored in the task file and shown by ``mercure queue``: say what failed and
    what the operator can do.
    """


class PermanentTargetError(TargetError):
    """Delivery can never succeed as configured (bad credentials, access denied, ...).

    The dispatcher moves the job to ``error/`` at once with this reason, without the retries
    that could never succeed (and would hammer the peer); an operator fixes the cause and runs
    ``mercure job retry``, which sends only what is still missing.
    """


MoreFiles = Callable[[float], "list[Path] | None"]


@dataclass(frozen=True)
class DeliveryJob:
    """What to send: the pending instance files of one job and what is known about them.

    ``more`` is set only for a job whose series is still arriving and whose target declared
    ``streaming = True``: after sending ``files``, call ``more(timeout)`` to wait up to
    ``timeout`` seconds for further files. It returns the new files (``[]`` if none came
    yet) or ``None`` once the series is complete and every file was handed out. Report the
    files it returned in the :class:`DeliveryResult` like the others.
    """

    task_id: str
    folder: Path
    files: list[Path]
    tags: Mapping[str, str]
    task: Task
    more: MoreFiles | None = None
    confirm: Callable[[list[str]], None] | None = None
    """Optional: report file names the target confirmed so far, during a long send. The
    dispatcher records them in the task file (at most about once a second), so that a
    dispatcher killed mid-send does not send them again. The final result still counts."""

    def index(self) -> InstanceIndex:
        """A file name ↔ SOP Instance UID index of ``files`` (read from their headers)."""
        from mercure.instances import InstanceIndex

        return InstanceIndex(self.files)

    def render(self, pattern: TagPattern, index: InstanceIndex, name: str, **extra: str) -> str:
        """The relative path or key of file ``name`` under ``pattern``.

        Values come from the file's own header first (a processed series may carry new UIDs),
        then from the job's tags, then ``task_id``, ``filename`` and ``extra``.
        """
        values: dict[str, str] = {**self.tags, "task_id": self.task_id, "filename": name}
        values.update(index.tags(name, pattern.fields))
        values.update(extra)
        return pattern.render(values)


@dataclass
class DeliveryResult:
    """What happened to each file of a :class:`DeliveryJob`.

    Files neither in ``delivered`` nor in ``failed`` count as failed with ``error``. Set
    ``permanent`` when the failures can never succeed as configured (as raising
    :class:`PermanentTargetError` does): the job goes to ``error/`` without further retries.
    """

    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    permanent: bool = False

    @classmethod
    def all_delivered(cls, job: DeliveryJob) -> DeliveryResult:
        return cls(delivered=[f.name for f in job.files])


ConfigT = TypeVar("ConfigT", bound=TargetConfig)


class Target(ABC, Generic[ConfigT]):
    """One configured target, created once per process and closed on shutdown.

    ``send`` may be called from several dispatcher threads at once (``dispatcher_workers``),
    for different jobs: a client that is not thread-safe (a paramiko ``SSHClient``) must be
    kept per thread or behind a lock. ``test_connection`` may run beside them.
    """

    #: True for targets that can send instances while the rest of the series still arrives
    #: (they keep their connection open and call ``DeliveryJob.more``). Others get a job only
    #: once its series is complete.
    streaming: ClassVar[bool] = False

    def __init__(self, name: str, config: ConfigT, context: PluginContext | None = None):
        self.name = name
        self.config = config
        self.context = context or PluginContext("target", name)

    @abstractmethod
    def send(self, job: DeliveryJob) -> DeliveryResult:
        """Deliver ``job.files``; raise :class:`TargetError` when nothing could be sent."""

    def finish(self, job: DeliveryJob) -> None:
        """Complete the series at the target, once every instance of the job is confirmed.

        Called after the last ``send``, with ``job.files`` = all instance files of the job,
        before the job moves to ``success/``: write a completion marker, rename a staging
        folder into place, upload a manifest. Raise :class:`TargetError` to be retried later
        (instances are not sent again; ``finish`` is), :class:`PermanentTargetError` to move
        the job to ``error/``. Once it returned, it is not called again for the job.
        """

    def test_connection(self) -> str:
        """Check that the target answers; return one line describing the outcome.

        Raise :class:`TargetError` with the reason when it does not.
        """
        return "no connection test for this target type"

    def start(self) -> None:
        """Called once before the first ``send``; connections may also be opened lazily."""

    def close(self) -> None:
        """Release connections or clients held between jobs (called once, on shutdown)."""
