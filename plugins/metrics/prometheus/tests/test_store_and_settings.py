"""Names, kinds, labels and settings of the Prometheus sink, checked on its exposition output
as parsed by prometheus_client's own text parser."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError
from mercure.lifecycle import PluginContext
from mercure.metrics import Metric
from mercure.testing import config_for
from mercure_metrics_prometheus import (
    MetricStore,
    PrometheusSettings,
    PrometheusSink,
    family_name,
    parse_address,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError


def exposition(store: MetricStore) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def test_names_follow_prometheus_conventions() -> None:
    assert family_name(Metric("incoming.files", 1), "mercure") == (
        "mercure_incoming_files",
        "counter",
    )
    assert family_name(Metric("x.requests_total", 1), "mercure") == (
        "mercure_x_requests",
        "counter",
    )
    assert family_name(Metric("dispatch.duration", 1.0, kind="timing"), "mercure") == (
        "mercure_dispatch_duration_seconds",
        "histogram",
    )
    assert family_name(Metric("spool.free-bytes", 1, kind="gauge"), "") == (
        "spool_free_bytes",
        "gauge",
    )


def test_counters_gauges_and_histograms_parse_with_prometheus_clients_parser() -> None:
    store = MetricStore("ct-1", buckets=[0.5, 1.0, 5.0])
    store.add(
        [
            Metric("incoming.files", 20),
            Metric("incoming.files", 5),
            Metric("dispatch.instances", 20, {"target": "pacs"}, service="dispatcher"),
            Metric("dispatch.instances", 3, {"target": "archive"}, service="dispatcher"),
            Metric("jobs.outgoing", 4, kind="gauge", service="spool"),
            Metric("jobs.outgoing", 2, kind="gauge", service="spool"),
            Metric(
                "dispatch.duration", 0.2, {"target": "pacs"}, kind="timing", service="dispatcher"
            ),
            Metric(
                "dispatch.duration", 3.0, {"target": "pacs"}, kind="timing", service="dispatcher"
            ),
            Metric(
                "dispatch.duration", 9.0, {"target": "pacs"}, kind="timing", service="dispatcher"
            ),
        ]
    )
    families = exposition(store)
    files = families["mercure_incoming_files"]
    assert files.type == "counter" and files.documentation == "DICOM instances received and routed"
    assert samples(files, "_total") == {(("appliance", "ct-1"), ("service", "router")): 25}
    delivered = samples(families["mercure_dispatch_instances"], "_total")
    assert {dict(k)["target"]: v for k, v in delivered.items()} == {"pacs": 20, "archive": 3}
    gauge = families["mercure_jobs_outgoing"]
    assert gauge.type == "gauge" and list(samples(gauge).values()) == [2]
    hist = families["mercure_dispatch_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {dict(k)["le"]: v for k, v in samples(hist, "_bucket").items()}
    assert buckets == {"0.5": 1, "1.0": 1, "5.0": 2, "+Inf": 3}
    assert list(samples(hist, "_count").values()) == [3]
    assert list(samples(hist, "_sum").values()) == [pytest.approx(12.2)]


def test_one_label_set_per_family_and_reserved_tag_names_are_renamed() -> None:
    store = MetricStore("master")
    store.add(
        [
            Metric("notifications.sent", 1, {"target": "hook"}, service="notifier"),
            Metric("notifications.sent", 1, {}, service="notifier"),
            Metric("jobs.created", 1, {"service": "x", "le": "y", "rule name": "z"}),
        ]
    )
    families = exposition(store)
    sent = families["mercure_notifications_sent"]
    labels = [s.labels for s in sent.samples if s.name.endswith("_total")]
    # The series without a target has no target label at all (not an empty one).
    assert sorted(labels, key=len) == [
        {"appliance": "master", "service": "notifier"},
        {"appliance": "master", "service": "notifier", "target": "hook"},
    ]
    (created,) = [s for s in families["mercure_jobs_created"].samples if s.name.endswith("_total")]
    assert created.labels == {
        "appliance": "master",
        "service": "router",
        "tag_service": "x",
        "tag_le": "y",
        "rule_name": "z",
    }


def test_what_cannot_be_exported_is_dropped_counted_and_the_rest_kept() -> None:
    store = MetricStore("master", max_series=3)
    store.add(
        [
            Metric("incoming.files", 1),
            Metric("incoming.files", -4),  # a counter cannot decrease
            Metric("incoming.files", float("nan")),
            Metric("incoming.files", 2, kind="gauge"),  # the same name as another kind
            Metric("a", 1, {"n": "1"}),
            Metric("a", 1, {"n": "2"}),
            Metric("a", 1, {"n": "3"}),  # the fourth series: over max_series
            Metric("a", 1, {"n": "1"}),  # an existing series still counts
        ]
    )
    assert store.dropped == 4
    families = exposition(store)
    assert list(samples(families["mercure_incoming_files"], "_total").values()) == [1]
    assert sorted(samples(families["mercure_a"], "_total").values()) == [1, 2]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("router.example.org:0", ("router.example.org", 0)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "address\n  Field required"),
        ({"address": ":9464"}, "has no host: use 127.0.0.1:PORT"),
        ({"address": "::1:9464"}, "in brackets"),
        ({"address": "[::1]9464"}, "as [::1]:9464"),
        ({"address": "localhost:http"}, "must be a number"),
        ({"address": "70000"}, "from 0 to 65535"),
        ({"address": "9464", "buckets": [5, 1]}, "ascending"),
        ({"address": "9464", "prefix": "my-router"}, "only letters, digits and '_'"),
        ({"address": "9464", "port": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_say_what_is_wrong(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        PrometheusSettings.model_validate(settings)
    assert message in str(info.value)


def test_configured_in_the_plugins_section(tmp_path: Path) -> None:
    config = config_for(
        tmp_path, plugins={"metrics_sinks": {"prometheus": {"address": "0.0.0.0:9464"}}}
    )
    (instance,) = config.plugin_instances("metrics_sink")
    assert instance.type_name == "prometheus"
    assert isinstance(instance.settings, PrometheusSettings)
    assert instance.settings.host_port == ("0.0.0.0", 9464)
    with pytest.raises(ConfigError, match=r"plugins\.metrics_sinks\.prometheus\.address"):
        config_for(tmp_path, plugins={"metrics_sinks": {"prometheus": {}}})


def test_an_address_in_use_is_a_clear_error_and_close_is_safe() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sink = PrometheusSink(
            "prometheus",
            PrometheusSettings(address=f"127.0.0.1:{port}"),
            PluginContext("metrics_sink", "prometheus"),
        )
        with pytest.raises(
            RuntimeError, match=f"cannot serve Prometheus metrics on 127.0.0.1:{port}"
        ):
            sink.start()
        sink.close()  # after a failed start, as the runtime does
