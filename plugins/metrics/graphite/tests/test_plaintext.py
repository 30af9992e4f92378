"""Names, lines and settings of the Graphite sink, without carbon."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
from graphite_support import make_sink
from mercure.config import ConfigError
from mercure.metrics import Metric
from mercure.testing import config_for
from mercure_metrics_graphite import Encoder, GraphiteSendError, GraphiteSettings, series_name
from pydantic import ValidationError

T = 1700000000.0


def test_mercures_fields_configure_the_sink(tmp_path: Path) -> None:
    config = config_for(tmp_path, graphite_ip="10.0.0.5", graphite_port=2103)
    (instance,) = config.plugin_instances("metrics_sink")
    assert (instance.name, instance.type_name) == ("graphite", "graphite")
    settings = instance.settings
    assert isinstance(settings, GraphiteSettings)
    assert (settings.host, settings.port, settings.prefix) == ("10.0.0.5", 2103, "mercure")
    assert (settings.tag_style, settings.counters, settings.connect_timeout) == (
        "path",
        "increments",
        2.0,
    )


def test_mercures_default_port_and_settings_from_the_plugins_section(tmp_path: Path) -> None:
    config = config_for(
        tmp_path,
        graphite_ip="carbon.example.org",
        plugins={"metrics_sinks": {"graphite": {"prefix": "router", "counters": "totals"}}},
    )
    (instance,) = config.plugin_instances("metrics_sink")
    settings = instance.settings
    assert isinstance(settings, GraphiteSettings)
    assert (settings.host, settings.port, settings.prefix, settings.counters) == (
        "carbon.example.org",
        2003,
        "router",
        "totals",
    )


def test_no_graphite_ip_no_sink(tmp_path: Path) -> None:
    assert config_for(tmp_path, graphite_port=2003).plugin_instances("metrics_sink") == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"host": ""}, "not a host name"),
        ({"host": "http://carbon/"}, "not a host name"),
        ({"host": "carbon", "port": 0}, "greater than or equal to 1"),
        ({"host": "carbon", "tag_style": "labels"}, "'path', 'tagged' or 'drop'"),
        ({"host": "carbon", "counters": "sum"}, "'increments' or 'totals'"),
        ({"host": "carbon", "prefix": "my prefix"}, "may not contain spaces"),
        ({"host": "carbon", "interval": 10}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_say_what_is_wrong(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        GraphiteSettings.model_validate(settings)
    assert message in str(info.value)


def test_a_bad_graphite_port_names_mercures_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_for(tmp_path, graphite_ip="10.0.0.5", graphite_port=70000)
    assert "graphite_port" in str(info.value)


def test_paths_are_mercures_and_tags_follow_the_tag_style() -> None:
    m = Metric("dispatch.instances", 3, {"target": "PACS main.1", "rule": "ct"}, T,
               service="dispatcher")  # fmt: skip
    assert series_name(Metric("incoming.files", 1), "master", "mercure", "path") == (
        "mercure.master.router.incoming.files"
    )
    assert series_name(m, "ct router", "mercure", "path") == (
        "mercure.ct_router.dispatcher.dispatch.instances.rule.ct.target.PACS_main_1"
    )
    assert series_name(m, "master", "mercure", "tagged") == (
        "mercure.master.dispatcher.dispatch.instances;rule=ct;target=PACS_main.1"
    )
    assert series_name(m, "master", "site", "drop") == "site.master.dispatcher.dispatch.instances"


def test_a_batch_is_combined_per_path_and_second() -> None:
    encoder = Encoder("master")
    lines = encoder.lines(
        [
            Metric("incoming.files", 10, {}, T + 0.1),
            Metric("incoming.files", 5, {}, T + 0.9),  # same second: summed
            Metric("incoming.files", 7, {}, T + 1.2),  # next second: a line of its own
            Metric("jobs.outgoing", 4, {}, T, "gauge", "spool"),
            Metric("jobs.outgoing", 2, {}, T + 0.5, "gauge", "spool"),  # last value wins
            Metric("dispatch.duration", 1.0, {}, T, "timing", "dispatcher"),
            Metric("dispatch.duration", 2.0, {}, T, "timing", "dispatcher"),  # mean
            Metric("spool.free_percent", math.nan, {}, T, "gauge", "spool"),  # not storable
        ]
    )
    assert sorted(lines) == sorted(
        [
            f"mercure.master.router.incoming.files 15 {int(T)}",
            f"mercure.master.router.incoming.files 7 {int(T) + 1}",
            f"mercure.master.spool.jobs.outgoing 2 {int(T)}",
            f"mercure.master.dispatcher.dispatch.duration 1.5 {int(T)}",
        ]
    )


def test_totals_keep_counting_across_batches() -> None:
    encoder = Encoder("master", counters="totals")
    assert encoder.lines([Metric("incoming.files", 10, {}, T)]) == [
        f"mercure.master.router.incoming.files 10 {int(T)}"
    ]
    # A batch that was lost in between does not lose counts: the next total includes them.
    encoder.lines([Metric("incoming.files", 5, {}, T + 1)])
    assert encoder.lines(
        [Metric("incoming.files", 1, {}, T + 2), Metric("x", 0.25, {}, T + 2)]
    ) == [
        f"mercure.master.router.incoming.files 16 {int(T) + 2}",
        f"mercure.master.router.x 0.25 {int(T) + 2}",
    ]


def test_an_unreachable_carbon_costs_one_connect_timeout_and_says_so() -> None:
    """A listener whose backlog is full never completes a connection, as an unreachable host:
    the sink gives up after ``connect_timeout`` instead of hanging on the sink's thread."""
    with socket.socket() as listener, socket.socket() as first:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        first.connect(listener.getsockname())  # fills the backlog; nothing accepts
        sink = make_sink(host="127.0.0.1", port=listener.getsockname()[1], connect_timeout=0.3)
        sink.start()
        try:
            with pytest.raises(GraphiteSendError, match=r"cannot connect to carbon .*: timed out"):
                sink.send([Metric("events.run", 1, {}, T)])
        finally:
            sink.close()
    assert sink.connects == 0
