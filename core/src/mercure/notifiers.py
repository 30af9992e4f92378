"""The contract for notifiers (webhook, e-mail, log): tell people what happened to a job."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mercure.config import Config, Rule

NotificationEvent = Literal["reception", "completion", "error"]


@dataclass(frozen=True)
class Notification:
    """A rule's notification for one job, with mercure's payload fields."""

    event: NotificationEvent
    rule_name: str
    rule: Rule
    task_id: str
    details: str = ""
    tags: dict[str, str] = field(default_factory=dict)


class Notifier(ABC):
    """Delivers notifications; decides from the rule whether it is asked for."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @abstractmethod
    def notify(self, notification: Notification) -> None:
        """Send the notification; raise on failure (the caller logs it, the job goes on)."""
