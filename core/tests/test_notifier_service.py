"""The notifier service's bookkeeping: tries, outcomes and failure counts in the outbox."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mercure.events import TaskEvent, TaskEventType
from mercure.metrics import Metric
from mercure.notifiers import Notification, NotificationError, PermanentNotificationError
from mercure.outbox import Outbox
from mercure.services.notifier import NotifierService


@dataclass
class Scripted:
    """A notifier whose tries go as scripted: an exception to raise, or a receipt."""

    script: list[Any]
    start_errors: list[Exception] = field(default_factory=list)
    part: str = ""  # "webhook" or "email": the part it sends; "" for both

    def problem(self, notification: Notification) -> str | None:
        if self.part:
            return getattr(notification, f"{self.part}_problem")
        return notification.problem

    def send(self, notification: Notification) -> str:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return str(step)


@dataclass
class StubRuntime:
    outbox: Outbox
    notifier_impl: Scripted
    config: Any = field(
        default_factory=lambda: SimpleNamespace(notification_retries=3, notification_retry_delay=1)
    )
    events: list[TaskEvent] = field(default_factory=list)
    counted: list[Metric] = field(default_factory=list)

    def notifier(self, name: str) -> Scripted:
        if name != "n":
            raise KeyError(name)
        if self.notifier_impl.start_errors:
            raise self.notifier_impl.start_errors.pop(0)
        return self.notifier_impl

    def emit(self, event: TaskEvent) -> None:
        self.events.append(event)

    def metrics(self, *metrics: Metric) -> None:
        self.counted.extend(metrics)


def run(tmp_path: Path, notifier: Scripted, note: Notification | None = None, name: str = "n"):
    outbox = Outbox(tmp_path / "outbox", fsync=False)
    runtime = StubRuntime(outbox, notifier)
    service = NotifierService(runtime)  # type: ignore[arg-type]
    outbox.put(name, note or Notification("completion", "rule", "task-1"))
    while outbox.count():
        for path in outbox.due(now=float("inf")):
            with outbox.claim(path) as entry:
                assert entry is not None
                service.deliver(entry)
    [record] = [json.loads(p.read_text()) for p in (outbox.done / "task-1").glob("*.json")]
    return record, runtime


def test_delivered_after_a_failure_counts_both_tries(tmp_path: Path) -> None:
    record, rt = run(tmp_path, Scripted([NotificationError("HTTP 503"), "HTTP 200"]))
    assert (record["outcome"], record["tries"], record["detail"]) == ("delivered", 2, "HTTP 200")
    assert [e.type for e in rt.events] == [TaskEventType.NOTIFICATION_SENT]
    assert rt.events[0].extra["tries"] == 2
    assert [m.name for m in rt.counted] == ["notifications.failures"]


def test_given_up_at_once_counts_the_one_try(tmp_path: Path) -> None:
    record, rt = run(tmp_path, Scripted([PermanentNotificationError("HTTP 404 no such hook")]))
    assert (record["outcome"], record["tries"]) == ("given up", 1)
    assert record["detail"] == "HTTP 404 no such hook"
    assert rt.events[0].type == TaskEventType.NOTIFICATION_GIVEN_UP
    assert rt.events[0].extra["tries"] == 1


def test_given_up_after_the_last_retry_counts_every_failure(tmp_path: Path) -> None:
    failures = [NotificationError(f"down {i}") for i in range(3)]
    record, rt = run(tmp_path, Scripted(list(failures)))
    assert (record["outcome"], record["tries"]) == ("given up", 3)
    assert record["detail"] == "gave up after 3 tries: down 2"
    assert [e.split(" ", 1)[1] for e in record["errors"][:2]] == ["down 0", "down 1"]
    assert len(rt.counted) == 3


def test_a_notification_that_cannot_be_sent_was_not_tried(tmp_path: Path) -> None:
    note = Notification("completion", "rule", "task-1", webhook_problem="payload is not JSON")
    record, rt = run(tmp_path, Scripted([]), note)
    assert (record["outcome"], record["tries"], record["detail"]) == (
        "given up",
        0,
        "payload is not JSON",
    )
    assert rt.events[0].extra["tries"] == 0


def test_a_broken_part_stops_only_the_notifier_that_sends_it(tmp_path: Path) -> None:
    note = Notification("completion", "rule", "task-1", email_problem="template is broken")
    record, _ = run(tmp_path / "webhook", Scripted(["HTTP 200"], part="webhook"), note)
    assert (record["outcome"], record["detail"]) == ("delivered", "HTTP 200")
    record, _ = run(tmp_path / "email", Scripted([], part="email"), note)
    assert (record["outcome"], record["tries"]) == ("given up", 0)
    assert record["detail"] == "template is broken"


def test_an_outbox_entry_written_with_one_problem_keeps_it_for_both_parts() -> None:
    data = Notification("completion", "rule", "task-1").to_json()
    del data["webhook_problem"], data["email_problem"]
    note = Notification.from_json({**data, "problem": "old"})
    assert (note.webhook_problem, note.email_problem, note.problem) == ("old", "old", "old")


def test_a_notifier_that_does_not_start_is_a_failed_try_then_retried(tmp_path: Path) -> None:
    notifier = Scripted(["sent"], start_errors=[OSError("no route to host")])
    record, rt = run(tmp_path, notifier)
    assert (record["outcome"], record["tries"]) == ("delivered", 2)
    assert "notifier 'n' did not start: no route to host" in record["errors"][0]
    assert len(rt.counted) == 1
