"""A site plugin for the end-to-end tests: a notifier that is down on request.

Configured as ``"plugins": {"notifiers": {"e2e_journal": {"journal": ..., "down_flag": ...}}}``:
while ``down_flag`` names a file that exists, every send raises ``NotificationError``;
otherwise each notification is appended to ``journal`` as one JSON line (its id, event, rule
and task), so a test can count deliveries per notification.
"""

from __future__ import annotations

import json
from pathlib import Path

from mercure import hookimpl
from mercure.notifiers import Notification, NotificationError, Notifier
from mercure.plugin_settings import PluginSettings
from mercure.registry import RegisterFn


class JournalSettings(PluginSettings):
    journal: str
    down_flag: str = ""


class JournalNotifier(Notifier[JournalSettings]):
    def send(self, notification: Notification) -> str:
        if self.settings.down_flag and Path(self.settings.down_flag).exists():
            raise NotificationError(f"test notifier is down while {self.settings.down_flag} exists")
        line = {
            "id": notification.id,
            "event": notification.event,
            "rule": notification.rule_name,
            "task_id": notification.task_id,
        }
        with open(self.settings.journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        return "journaled"


@hookimpl
def register_notifiers(register: RegisterFn) -> None:
    register("e2e_journal", JournalSettings, JournalNotifier)
