"""The webhook notifier's settings: mercure's field, the plugins section, errors at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError
from mercure.testing import config_for
from mercure_notifier_webhook import WebhookSettings

RULES = {
    "ct": {
        "rule": "True",
        "action": "notification",
        "notification_webhook": "https://hooks.example.org/x",
    }
}


def errors_of(tmp_path: Path, **overrides: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config_for(tmp_path, rules=RULES, **overrides)
    return dict(info.value.errors)


def test_a_rule_with_a_webhook_switches_the_notifier_on_with_mercures_ca_field(
    tmp_path: Path, certs: Any
) -> None:
    config = config_for(tmp_path, rules=RULES, webhook_certificate_location=str(certs.ca_file))
    [instance] = config.plugin_instances("notifier")
    assert (instance.name, instance.type_name) == ("webhook", "webhook")
    assert isinstance(instance.settings, WebhookSettings)
    assert instance.settings.ca_bundle == str(certs.ca_file)
    assert instance.settings.timeout == 30.0
    assert instance.settings.secret is None


def test_settings_from_the_plugins_section_with_a_secret_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_KEY", "k1")
    section = {"webhook": {"secret": "${env:HOOK_KEY}", "timeout": 5, "headers": {"X-A": "b"}}}
    config = config_for(tmp_path, rules=RULES, plugins={"notifiers": section})
    [instance] = config.plugin_instances("notifier")
    assert isinstance(instance.settings, WebhookSettings)
    assert (instance.settings.secret, instance.settings.timeout) == ("k1", 5.0)
    assert instance.settings.headers == {"X-A": "b"}


def test_a_missing_ca_bundle_is_an_error_at_mercures_field(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, webhook_certificate_location=str(tmp_path / "nope.pem"))
    assert "does not exist" in errors["webhook_certificate_location"]


def test_a_ca_bundle_that_is_not_pem_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    errors = errors_of(tmp_path, webhook_certificate_location=str(bad))
    assert "cannot be loaded as PEM" in errors["webhook_certificate_location"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"timeout": 0}, "greater than 0"),
        ({"headers": {"Bad Name": "x"}}, "not a valid HTTP header name"),
        ({"headers": {"Content-Length": "1"}}, "set by the notifier itself"),
        ({"headers": {"X-A": "a\r\nX-B: b"}}, "line break"),
        ({"secret": "k", "headers": {"x-mercure-signature": "forged"}}, "signature header"),
        ({"secret": ""}, "secret is empty"),
        ({"secret": "${env:NOT_SET_ANYWHERE_42}"}, "NOT_SET_ANYWHERE_42 is not set"),
        ({"tiemout": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_errors_with_their_path(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    errors = errors_of(tmp_path, plugins={"notifiers": {"webhook": settings}})
    assert any(
        path.startswith("plugins.notifiers.webhook") and message in text
        for path, text in errors.items()
    ), errors
