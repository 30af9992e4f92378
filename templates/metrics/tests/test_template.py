"""The metrics-sink template: settings, and the metrics of a real routed series."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mercure_metrics_template as plugin
import pytest
from mercure.config import ConfigError, validate_config
from mercure.plugins import PluginManager
from mercure.testing import config_for, dcmtk_storescu, make_series, start_router, wait_for


def test_settings_are_validated(plugin_manager: PluginManager, register_plugin) -> None:
    register_plugin(plugin, "metrics_template")
    data = {"plugins": {"metrics_sinks": {"template": {"path": "/tmp/m.jsonl", "prefx": "x"}}}}
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    assert "plugins.metrics_sinks.template.prefx" in dict(info.value.errors)


@pytest.mark.peer
def test_a_routed_series_shows_in_the_metrics(tmp_path: Path) -> None:
    out, target = tmp_path / "metrics.jsonl", tmp_path / "target"
    target.mkdir()
    config = config_for(
        tmp_path,
        appliance_name="ct1",
        metrics_interval=0.5,
        dicom_receiver={"bind_address": "127.0.0.1"},
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
        plugins={"metrics_sinks": {"template": {"path": str(out)}}},
    )

    def names() -> dict[str, float]:
        text = out.read_text() if out.exists() else ""
        totals: dict[str, float] = {}
        for line in text.splitlines():
            m = json.loads(line)
            totals[m["name"]] = totals.get(m["name"], 0) + m["value"]
        return totals

    with contextlib.contextmanager(start_router)(config) as router:
        dcmtk_storescu(make_series(tmp_path / "series", 4), router.port)
        wait_for(
            lambda: "mercure.ct1.dispatcher.dispatch.instances" in names() or None,
            timeout=60,
            what="the delivery metric",
        )
    totals = names()
    assert totals["mercure.ct1.router.incoming.files"] == 4
    assert totals["mercure.ct1.dispatcher.dispatch.instances"] == 4
    assert "mercure.ct1.spool.spool.free_bytes" in totals
    assert "mercure.ct1.router.events.shutdown" in totals
