"""The v1 write API against a real InfluxDB 1.x (Debian's ``influxdb``): a query sees the points."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from influx_support import ADMIN, Influxd, make_sink
from mercure.metrics import Metric
from mercure.testing import dcmtk_storescu, folder_router, make_series, wait_for
from mercure_metrics_influxdb import InfluxDBWriteError

pytestmark = pytest.mark.peer


def v1(influxd: Influxd, database: str, **extra: Any) -> dict[str, Any]:
    return {
        "host": influxd.url,
        "api": "v1",
        "database": database,
        "username": ADMIN[0],
        "password": ADMIN[1],
        **extra,
    }


def test_a_query_sees_counters_gauges_and_timings_with_their_tags(influxd: Influxd) -> None:
    db = influxd.new_database()
    now = time.time()
    sink = make_sink(**v1(influxd, db, tags={"site": "north"}))
    sink.start()
    try:
        sink.send(
            [
                Metric("dispatch.instances", 20, {"target": "PACS main, room=2"}, now,
                       service="dispatcher"),
                Metric("dispatch.instances", 5, {"target": "archive"}, now + 0.001,
                       service="dispatcher"),
                Metric("spool.free_percent", 42.5, {}, now, "gauge", "spool"),
                Metric("dispatch.duration", 1.25, {"target": "archive"}, now, "timing",
                       "dispatcher"),
            ]
        )  # fmt: skip
        sink.send([Metric("jobs created", 1, {"rule": 'C:\\rules\\ "ct" = 1\\'}, now)])
        sink.send([Metric("dispatch.instances", 7, {"target": "archive"}, now + 0.002,
                          service="dispatcher")])  # fmt: skip
    finally:
        sink.close()

    rows = influxd.rows(
        'SELECT sum("value") FROM "mercure.master.dispatcher.dispatch.instances" GROUP BY "target"',
        db,
    )
    assert {r["target"]: r["sum"] for r in rows} == {"PACS main, room=2": 20, "archive": 12}
    (odd,) = influxd.rows('SELECT * FROM "mercure.master.router.jobs_created"', db)
    assert odd["rule"] == 'C:/rules/ "ct" = 1/'  # backslashes cannot be written alike in 1.x/2.x
    assert odd["value"] == 1
    (gauge,) = influxd.rows('SELECT * FROM "mercure.master.spool.spool.free_percent"', db)
    assert gauge["value"] == 42.5 and gauge["site"] == "north"
    assert abs(gauge["time"] - round(now * 1000)) <= 1
    (timing,) = influxd.rows('SELECT * FROM "mercure.master.dispatcher.dispatch.duration"', db)
    assert (timing["value"], timing["target"]) == (1.25, "archive")
    # Counters are integer fields (as mercure wrote them), gauges floats.
    types = influxd.query("SHOW FIELD KEYS", db)[0]["series"]
    field_types = {s["name"]: s["values"][0][1] for s in types}
    assert field_types["mercure.master.dispatcher.dispatch.instances"] == "integer"
    assert field_types["mercure.master.spool.spool.free_percent"] == "float"


def test_wrong_password_and_missing_database_raise_with_influxdbs_answer(
    influxd: Influxd,
) -> None:
    db = influxd.new_database()
    metric = Metric("incoming.files", 1)
    for settings, status, words in (
        (v1(influxd, db, password="wrong"), "401", "check username and password"),
        (v1(influxd, "no_such_db"), "404", 'database not found: "no_such_db"'),
    ):
        sink = make_sink(**settings)
        sink.start()
        try:
            with pytest.raises(InfluxDBWriteError) as info:
                sink.send([metric])
        finally:
            sink.close()
        assert f"InfluxDB answered {status}" in str(info.value)
        assert words in str(info.value)
        assert "wrong" not in str(info.value)  # no password in the message


def test_a_routed_series_shows_up_in_influxdb(tmp_path: Path, influxd: Influxd) -> None:
    db = influxd.new_database()
    plugins = {"metrics_sinks": {"influxdb": v1(influxd, db)}}
    with folder_router(tmp_path, plugins=plugins, appliance_name="ct-router") as running:
        dcmtk_storescu(make_series(tmp_path / "series", 30, rows=8, columns=8), running.port)
        wait_for(lambda: len(list((tmp_path / "target").rglob("*.dcm"))) == 30, timeout=60,
                 what="delivery")  # fmt: skip

        def total(measurement: str) -> float:
            rows = influxd.rows(f'SELECT sum("value") FROM "{measurement}"', db)
            return float(rows[0]["sum"]) if rows else 0.0

        wanted = {
            "mercure.ct-router.router.incoming.files": 30,
            "mercure.ct-router.router.incoming.series": 1,
            "mercure.ct-router.dispatcher.dispatch.instances": 30,
            "mercure.ct-router.dispatcher.jobs.completed": 1,
        }
        wait_for(lambda: all(total(m) == n for m, n in wanted.items()), timeout=30,
                 what=f"{wanted} in InfluxDB")  # fmt: skip
        created = influxd.rows('SELECT * FROM "mercure.ct-router.router.jobs.created"', db)
        assert [r["action"] for r in created] == ["route"]
        hub = running.supervisor.runtime.metrics_hub
        assert hub.stats()["influxdb"].dropped == 0
    # events.shutdown was flushed by the close.
    assert total("mercure.ct-router.router.events.shutdown") == 1
