"""Settings of plugin instances of every kind but targets: runners, notifiers, metrics sinks.

Each instance is validated against the pydantic model its type registered, and the instance
later gets only those settings, never the whole configuration. Two sources, merged key by key
(the explicit section wins):

* mercure's flat fields, mapped onto instances of the types mercure knows, so that an existing
  ``mercure.json`` keeps working: ``graphite_ip``/``graphite_port`` configure a ``graphite``
  metrics sink, ``influxdb_*`` an ``influxdb`` sink, ``process_runner`` the runner,
  ``email_notification_from`` the ``email`` notifier (used by rules with
  ``notification_email``), ``webhook_certificate_location`` the ``webhook`` notifier (used by
  rules with ``notification_webhook``), ``bookkeeper_api_key`` (which switches it on, as in
  mercure) and ``bookkeeper`` the ``bookkeeper`` monitor (``api_key``, ``address``);
  A type that no installed plugin provides is a warning there (the configuration loads with the
  core alone, and the warning names the distribution to install);
* the ``plugins`` section, for what mercure has no field for (a type named there that no
  installed plugin provides is an error)::

      "plugins": {
        "notifiers": {"email": {"smtp_host": "mail.example.org", "starttls": true}},
        "metrics_sinks": {"graphite": {"prefix": "router"},
                          "backup_graphite": {"type": "graphite", "host": "10.0.0.7"}},
        "runners": {"docker": {"docker_url": "unix:///run/docker.sock"}}
      }

  keyed by kind, then by instance name; ``type`` names the plugin type and defaults to the
  instance name. An instance is created only if it is configured: an installed plugin that no
  setting asks for does not start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from mercure.registry import Kind, Registry

#: The ``plugins`` section's keys and the kinds they configure.
SECTION_KINDS: dict[str, Kind] = {
    "runners": "runner",
    "notifiers": "notifier",
    "metrics_sinks": "metrics_sink",
    "receivers": "receiver",
    "monitors": "monitor",
    "services": "service",
}
KIND_SECTIONS: dict[Kind, str] = {kind: key for key, kind in SECTION_KINDS.items()}


class PluginSettings(BaseModel):
    """Base for a runner's, notifier's, metrics sink's or receiver's settings model.

    Unknown keys are errors (a misspelled setting must not be silently ignored). Use
    :data:`mercure.secrets.Secret` for passwords and tokens.
    """

    model_config = ConfigDict(extra="forbid")


class NoSettings(PluginSettings):
    """The settings of a type that registered no model: nothing may be set."""


@dataclass(frozen=True)
class PluginInstance:
    """One configured instance: its name, its type and its validated settings."""

    kind: Kind
    name: str
    type_name: str
    settings: BaseModel


# mercure's flat field -> (kind, instance/type name, setting key); the sink or notifier exists
# only when the field that switches it on (marked True) has a value.
LEGACY_FIELDS: tuple[tuple[str, Kind, str, str, bool], ...] = (
    ("graphite_ip", "metrics_sink", "graphite", "host", True),
    ("graphite_port", "metrics_sink", "graphite", "port", False),
    ("influxdb_host", "metrics_sink", "influxdb", "host", True),
    ("influxdb_token", "metrics_sink", "influxdb", "token", False),
    ("influxdb_org", "metrics_sink", "influxdb", "org", False),
    ("influxdb_bucket", "metrics_sink", "influxdb", "bucket", False),
    ("webhook_certificate_location", "notifier", "webhook", "ca_bundle", False),
    ("email_notification_from", "notifier", "email", "from_address", False),
    # mercure posts to its bookkeeper only when an API key is set.
    ("bookkeeper_api_key", "monitor", "bookkeeper", "api_key", True),
    ("bookkeeper", "monitor", "bookkeeper", "address", False),
)


PLACEHOLDERS = {"BOOKKEEPER_TOKEN_PLACEHOLDER"}
"""Values of mercure's default file that its installer replaces: they switch nothing on."""


def _legacy_instances(
    data: Mapping[str, Any],
) -> tuple[dict[Kind, dict[str, dict[str, Any]]], dict[tuple[Kind, str, str], str]]:
    """Instances implied by mercure's flat fields, and where each setting came from."""
    found: dict[Kind, dict[str, dict[str, Any]]] = {}
    origin: dict[tuple[Kind, str, str], str] = {}
    enabled: set[tuple[Kind, str]] = set()
    for field, kind, name, _key, switch in LEGACY_FIELDS:
        if switch and data.get(field) and data.get(field) not in PLACEHOLDERS:
            enabled.add((kind, name))
    rules = data.get("rules") if isinstance(data.get("rules"), dict) else {}
    for rule_name, rule in (rules or {}).items():
        if not isinstance(rule, dict) or rule.get("disabled"):
            continue
        for field, name in (("notification_webhook", "webhook"), ("notification_email", "email")):
            if rule.get(field):
                enabled.add(("notifier", name))
                origin.setdefault(("notifier", name, "type"), f"rules.{rule_name}.{field}")
    runner = data.get("process_runner")
    if isinstance(runner, str) and runner:
        found.setdefault("runner", {})[runner] = {}
        origin[("runner", runner, "type")] = "process_runner"
    for field, kind, name, key, _switch in LEGACY_FIELDS:
        if (kind, name) not in enabled or field not in data:
            continue
        value = data[field]
        if value is None or value == "":
            continue
        found.setdefault(kind, {}).setdefault(name, {})[key] = value
        origin[(kind, name, key)] = field
    for kind, name in enabled:
        found.setdefault(kind, {}).setdefault(name, {})
    return found, origin


def resolve_plugin_instances(
    data: Mapping[str, Any], registry: Registry
) -> tuple[dict[Kind, list[PluginInstance]], list[tuple[str, str]], list[str]]:
    """Validate every configured instance; return them, errors ``(path, message)``, warnings."""
    from mercure.registry import UnknownTypeError

    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    legacy, origin = _legacy_instances(data)
    section = data.get("plugins", {})
    if not isinstance(section, dict):
        return {}, [("plugins", "must be an object keyed by kind")], []
    merged: dict[Kind, dict[str, dict[str, Any]]] = {k: dict(v) for k, v in legacy.items()}
    for key, instances in section.items():
        kind = SECTION_KINDS.get(key)
        if kind is None:
            errors.append(
                (f"plugins.{key}", f"unknown kind; use one of {', '.join(sorted(SECTION_KINDS))}")
            )
            continue
        if not isinstance(instances, dict):
            errors.append((f"plugins.{key}", "must be an object keyed by instance name"))
            continue
        for name, settings in instances.items():
            if not isinstance(settings, dict):
                errors.append((f"plugins.{key}.{name}", "must be an object of settings"))
                continue
            base = merged.setdefault(kind, {}).get(name, {})
            merged[kind][name] = {**base, **settings}

    resolved: dict[Kind, list[PluginInstance]] = {}
    for kind, instances in merged.items():
        for name, raw in instances.items():
            settings = dict(raw)
            type_name = settings.pop("type", name)
            path = f"plugins.{KIND_SECTIONS[kind]}.{name}"
            from_legacy = name in legacy.get(kind, {}) and name not in section.get(
                KIND_SECTIONS[kind], {}
            )
            try:
                plugin_type = registry.get(kind, str(type_name))
            except UnknownTypeError as exc:
                if from_legacy:
                    # mercure's own fields keep loading with the core alone; say what is lost.
                    where = _legacy_path(origin, kind, name)
                    lost = {
                        "metrics_sink": "metrics are",
                        "notifier": "notifications are",
                        "monitor": "its events are",
                    }
                    warnings.append(
                        f"{where}: {exc} Until then {lost.get(kind, 'it is')} not sent."
                    )
                else:
                    errors.append((f"{path}.type", str(exc)))
                continue
            model: type[BaseModel] = plugin_type.config_model or NoSettings
            try:
                value = model.model_validate(settings)
            except ValidationError as exc:
                for err in exc.errors():
                    loc = tuple(str(p) for p in err["loc"])
                    field_origin = origin.get((kind, name, loc[0])) if loc else None
                    where = (
                        field_origin
                        if field_origin and name not in section.get(KIND_SECTIONS[kind], {})
                        else ".".join((path, *loc))
                    )
                    errors.append((where, err["msg"]))
                continue
            resolved.setdefault(kind, []).append(
                PluginInstance(kind, name, plugin_type.name, value)
            )
    return resolved, errors, warnings


def _legacy_path(origin: dict[tuple[Kind, str, str], str], kind: Kind, name: str) -> str:
    """Where the configuration asked for this instance: the field that switched it on."""
    if (kind, name, "type") in origin:
        return origin[(kind, name, "type")]
    for field, field_kind, field_name, _key, switch in LEGACY_FIELDS:
        if switch and field_kind == kind and field_name == name:
            return field
    return f"plugins.{KIND_SECTIONS[kind]}.{name}"


__all__ = [
    "KIND_SECTIONS",
    "LEGACY_FIELDS",
    "SECTION_KINDS",
    "NoSettings",
    "PluginInstance",
    "PluginSettings",
    "resolve_plugin_instances",
]
