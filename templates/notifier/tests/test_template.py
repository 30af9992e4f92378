"""The notifier template: settings, and the notifications of a real routed series."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mercure_notifier_template as plugin
import pytest
from mercure.config import ConfigError, validate_config
from mercure.plugins import PluginManager
from mercure.testing import config_for, dcmtk_storescu, make_series, start_router, wait_for


def test_settings_are_validated(plugin_manager: PluginManager, register_plugin) -> None:
    register_plugin(plugin, "notifier_template")
    data = {"plugins": {"notifiers": {"template": {"path": "/tmp/x.jsonl", "events": ["error"]}}}}
    config, _ = validate_config(data, plugin_manager.registry)
    (instance,) = config.plugin_instances("notifier")
    assert instance.settings.events == ["error"]
    data["plugins"]["notifiers"]["template"] = {"path": "/tmp/x", "events": ["sent"]}
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    assert "plugins.notifiers.template.events.0" in dict(info.value.errors)


@pytest.mark.peer
def test_a_routed_series_is_announced_on_reception_and_completion(tmp_path: Path) -> None:
    """Installed as a real plugin (entry point): no registration by hand."""
    notes, target = tmp_path / "notes.jsonl", tmp_path / "target"
    target.mkdir()
    config = config_for(
        tmp_path,
        dicom_receiver={"bind_address": "127.0.0.1"},
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={
            "ct": {
                "rule": "tags.Modality == 'CT'",
                "target": "folder",
                "notification_payload": '"text": "@rule@ {{ event }}"',
            }
        },
        plugins={"notifiers": {"template": {"path": str(notes)}}},
    )
    with contextlib.contextmanager(start_router)(config) as router:
        dcmtk_storescu(make_series(tmp_path / "series", 3), router.port)

        def lines() -> list[dict[str, object]]:
            text = notes.read_text() if notes.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        wait_for(lambda: len(lines()) == 2 or None, timeout=60, what="two notifications")
    assert [(n["event"], n["rule"]) for n in lines()] == [("RECEIVED", "ct"), ("COMPLETED", "ct")]
    assert lines()[1]["webhook_payload"] is None  # the rule has no notification_webhook
    assert lines()[0]["email_subject"] == "[Mercure] Rule ct: RECEIVED"
