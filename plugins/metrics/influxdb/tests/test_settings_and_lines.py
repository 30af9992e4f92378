"""Settings (mercure's fields and the plugins section) and the line protocol, without a server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from influx_support import make_sink, parse_line
from mercure.config import ConfigError
from mercure.metrics import Metric
from mercure.testing import config_for
from mercure_metrics_influxdb import InfluxDBSettings, encode
from pydantic import ValidationError

V2 = {"host": "http://influx:8086", "token": "t", "org": "o", "bucket": "b"}


def test_mercures_fields_configure_the_sink(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        influxdb_host="http://influx.example.org:8086",
        influxdb_token="secret-token",
        influxdb_org="radiology",
        influxdb_bucket="mercure",
    )
    (instance,) = config.plugin_instances("metrics_sink")
    assert (instance.name, instance.type_name) == ("influxdb", "influxdb")
    settings = instance.settings
    assert isinstance(settings, InfluxDBSettings)
    assert (settings.host, settings.token, settings.org, settings.bucket) == (
        "http://influx.example.org:8086",
        "secret-token",
        "radiology",
        "mercure",
    )
    assert settings.api == "v2" and settings.gzip


def test_the_plugins_section_selects_v1_and_wins_over_mercures_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFLUX_PW", "pw-from-env")
    config = config_for(
        tmp_path,
        influxdb_host="influx:8086",
        plugins={
            "metrics_sinks": {
                "influxdb": {
                    "api": "v1",
                    "database": "mercure",
                    "username": "router",
                    "password": "${env:INFLUX_PW}",
                    "tags": {"site": "north"},
                }
            }
        },
    )
    (instance,) = config.plugin_instances("metrics_sink")
    settings = instance.settings
    assert isinstance(settings, InfluxDBSettings)
    assert settings.host == "http://influx:8086"  # no scheme given: http
    assert (settings.api, settings.database, settings.password) == ("v1", "mercure", "pw-from-env")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"host": "http://i:8086"}, "needs token, org, bucket"),
        ({**V2, "bucket": ""}, "influxdb_bucket"),
        ({"host": "http://i:8086", "api": "v1"}, 'needs "database"'),
        ({**V2, "host": ""}, "URL is empty"),
        ({**V2, "host": "ftp://i:21"}, "not an http(s) URL"),
        ({**V2, "api": "v3"}, "'v2' or 'v1'"),
        ({**V2, "batch": 5}, "Extra inputs are not permitted"),
        ({"host": "i", "api": "v1", "database": "d", "password": "x"}, 'without "username"'),
    ],
)
def test_bad_settings_say_what_is_wrong(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        InfluxDBSettings.model_validate(settings)
    assert message in str(info.value)


def test_a_configuration_error_names_mercures_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_for(tmp_path, influxdb_host="http://influx:8086", influxdb_org="o")
    assert "influxdb_token" in str(info.value) and "influxdb_bucket" in str(info.value)


def test_counters_gauges_and_timings_map_onto_one_value_field() -> None:
    counter = Metric("dispatch.instances", 20, {"target": "pacs"}, 1700000000.1234, "counter",
                     "dispatcher")  # fmt: skip
    gauge = Metric("spool.free_percent", 42, {}, 1700000000.0, "gauge", "spool")
    timing = Metric("dispatch.duration", 1.5, {"target": "pacs"}, 1700000000.0, "timing",
                    "dispatcher")  # fmt: skip
    assert encode(counter, "master") == (
        "mercure.master.dispatcher.dispatch.instances,target=pacs value=20i 1700000000123"
    )
    assert encode(gauge, "master") == (
        "mercure.master.spool.spool.free_percent value=42.0 1700000000000"
    )
    assert parse_line(encode(timing, "ct-1", "router")).fields == {"value": 1.5}
    # A fractional counter (the core sends none) stays exact as a float.
    assert parse_line(encode(Metric("x", 0.5), "m")).fields == {"value": 0.5}


def test_special_characters_in_tags_and_names_survive_the_round_trip() -> None:
    tags = {"target": "PACS main, room=2", "rule": 'a\\b "c"', "empty": ""}
    metric = Metric("jobs created", 1, tags, 1700000000.0, service="router")
    point = parse_line(encode(metric, "app one", extra_tags={"site": "north", "rule": "ignored"}))
    assert point.measurement == "mercure.app_one.router.jobs_created"
    assert point.tags == {"target": "PACS main, room=2", "rule": 'a/b "c"', "site": "north"}
    assert point.fields == {"value": 1}
    assert point.timestamp == 1700000000000


def test_unwritable_values_are_left_out_and_the_rest_is_kept() -> None:
    sink = make_sink(**V2)
    batch = [
        Metric("spool.free_percent", math.nan, kind="gauge"),
        Metric("incoming.files", 3),
        Metric("spool.free_percent", math.inf, kind="gauge"),
    ]
    lines = sink.lines(batch)
    assert len(lines) == 1 and lines[0].startswith("mercure.master.router.incoming.files ")
