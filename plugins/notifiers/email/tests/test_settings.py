"""The e-mail notifier's settings: mercure's field, the plugins section, errors at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mercure.config import ConfigError
from mercure.testing import config_for
from mercure_notifier_email import EmailSettings

RULES = {
    "ct": {
        "rule": "True",
        "action": "notification",
        "notification_email": "a@example.org, b@example.org",
    }
}


def errors_of(tmp_path: Path, **overrides: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        config_for(tmp_path, rules=RULES, **overrides)
    return dict(info.value.errors)


def test_mercures_defaults_localhost_25_and_its_sender(tmp_path: Path) -> None:
    config = config_for(tmp_path, rules=RULES)
    [instance] = config.plugin_instances("notifier")
    settings = instance.settings
    assert (instance.name, instance.type_name) == ("email", "email")
    assert isinstance(settings, EmailSettings)
    assert (settings.smtp_host, settings.port) == ("localhost", 25)
    assert settings.from_address == "mercure@mercure.mercure"
    assert not (settings.starttls or settings.implicit_tls or settings.username)


def test_email_notification_from_and_the_plugins_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "pw")
    section = {
        "email": {
            "smtp_host": "mail.example.org",
            "implicit_tls": True,
            "username": "router",
            "password": "${env:SMTP_PASSWORD}",
        }
    }
    config = config_for(
        tmp_path,
        rules=RULES,
        email_notification_from="Router <router@example.org>",
        plugins={"notifiers": section},
    )
    [instance] = config.plugin_instances("notifier")
    settings = instance.settings
    assert isinstance(settings, EmailSettings)
    assert settings.from_address == "Router <router@example.org>"
    assert settings.envelope_from == "router@example.org"
    assert (settings.port, settings.password) == (465, "pw")


def test_a_bad_sender_is_an_error_at_mercures_field(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, email_notification_from="mercure")
    assert "not an e-mail address" in errors["email_notification_from"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"starttls": True, "implicit_tls": True}, "exclude each other"),
        ({"username": "x"}, "password is not"),
        ({"password": "x"}, "username is not"),
        ({"ca_bundle": "/nonexistent/ca.pem", "starttls": True}, "does not exist"),
        ({"smtp_port": 0}, "greater than or equal to 1"),
        ({"smtp_host": " "}, "is empty"),
        ({"smtp_hots": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_errors_with_their_path(
    tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    errors = errors_of(tmp_path, plugins={"notifiers": {"email": settings}})
    assert any(
        path.startswith("plugins.notifiers.email") and message in text
        for path, text in errors.items()
    ), errors


def test_a_ca_bundle_without_tls_is_an_error(tmp_path: Path, certs: Any) -> None:
    errors = errors_of(
        tmp_path, plugins={"notifiers": {"email": {"ca_bundle": str(certs.ca_file)}}}
    )
    assert any("only with starttls or implicit_tls" in text for text in errors.values()), errors
