"""The types that plugins register: target, receiver, runner, notifier and metrics-sink types.

A :class:`Registry` is filled once by the plugin manager from the ``register_*`` hooks and then
only read. Each entry remembers the distribution that registered it, so that a duplicate type
name or a missing one can be reported with the package to install or remove.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

Kind = Literal["target", "receiver", "runner", "notifier", "metrics_sink", "monitor", "service"]
KINDS: tuple[Kind, ...] = (
    "target",
    "receiver",
    "runner",
    "notifier",
    "metrics_sink",
    "monitor",
    "service",
)

RegisterFn = Callable[[str, "type[BaseModel] | None", type], None]
"""The ``register(type_name, ConfigModel, Implementation)`` callback handed to plugins."""

# mercure's own type names, and the distribution that provides each: used to tell a user what
# to install when a configuration names a type that no installed plugin provides.
KNOWN_DISTRIBUTIONS: dict[Kind, dict[str, str]] = {
    "target": {
        "dicom": "mercure-target-dicom",
        "dicomtls": "mercure-target-dicom",
        "dicomweb": "mercure-target-dicomweb",
        "s3": "mercure-target-s3",
        "sftp": "mercure-target-sftp",
        "rsync": "mercure-target-rsync",
        "xnat": "mercure-target-xnat",
    },
    "runner": {"docker": "mercure-runner-docker", "nomad": "mercure-runner-nomad"},
    "notifier": {"webhook": "mercure-notifier-webhook", "email": "mercure-notifier-email"},
    "metrics_sink": {
        "influxdb": "mercure-metrics-influxdb",
        "graphite": "mercure-metrics-graphite",
        "prometheus": "mercure-metrics-prometheus",
    },
    "receiver": {"dicomweb": "mercure-receiver-dicomweb"},
    "monitor": {"bookkeeper": "mercure-monitor-bookkeeper"},
    "service": {"web": "mercure-web-dashboard"},
}


class PluginRegistrationError(RuntimeError):
    """A plugin registered something invalid (duplicate type name, wrong model, ...)."""


class UnknownTypeError(LookupError):
    """A configuration names a type that no installed plugin provides."""

    def __init__(self, kind: Kind, type_name: str, available: list[str]) -> None:
        self.kind = kind
        self.type_name = type_name
        dist = KNOWN_DISTRIBUTIONS.get(kind, {}).get(type_name)
        kind_text = kind.replace("_", " ")
        hint = (
            f"install it with `pip install {dist}`"
            if dist
            else f"install the plugin that provides it (a distribution named "
            f"mercure-{kind.replace('_', '-')}-{type_name}, or a site plugin)"
        )
        have = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"no installed plugin provides {kind_text} type '{type_name}': {hint}. "
            f"Installed {kind_text} types: {have}."
        )


@dataclass(frozen=True)
class PluginType:
    """One registered type: its name, configuration model, implementation and origin."""

    kind: Kind
    name: str
    config_model: type[BaseModel] | None
    implementation: type
    plugin: str
    distribution: str


@dataclass
class Registry:
    """All registered types by kind and name."""

    types: dict[Kind, dict[str, PluginType]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    def add(self, entry: PluginType) -> None:
        existing = self.types[entry.kind].get(entry.name)
        if existing is not None:
            raise PluginRegistrationError(
                f"{entry.kind.replace('_', ' ')} type '{entry.name}' is registered twice: by "
                f"{existing.distribution} (plugin {existing.plugin}) and by "
                f"{entry.distribution} (plugin {entry.plugin}); uninstall one of them"
            )
        self.types[entry.kind][entry.name] = entry

    def get(self, kind: Kind, name: str) -> PluginType:
        try:
            return self.types[kind][name]
        except KeyError:
            raise UnknownTypeError(kind, name, list(self.types[kind])) from None

    def names(self, kind: Kind) -> list[str]:
        return sorted(self.types[kind])

    def __iter__(self) -> Iterator[PluginType]:
        for kind in KINDS:
            yield from self.types[kind].values()

    def config_models(self, kind: Kind) -> list[type[BaseModel]]:
        return [t.config_model for t in self.types[kind].values() if t.config_model is not None]


def make_register(
    registry: Registry, kind: Kind, plugin: str, distribution: str, base: type | None
) -> Callable[..., None]:
    """Build the ``register`` callback for one plugin and one kind, checking what it adds."""

    def register(
        type_name: str, config_model: type[BaseModel] | None, implementation: type, **_: Any
    ) -> None:
        if not isinstance(type_name, str) or not type_name:
            raise PluginRegistrationError(f"{plugin}: a {kind} type name must be a non-empty str")
        if config_model is not None and not (
            isinstance(config_model, type) and issubclass(config_model, BaseModel)
        ):
            raise PluginRegistrationError(
                f"{plugin}: the config model of {kind} type '{type_name}' must be a pydantic model"
            )
        if kind == "target":
            _check_target_model(plugin, type_name, config_model)
        if base is not None and not (
            isinstance(implementation, type) and issubclass(implementation, base)
        ):
            raise PluginRegistrationError(
                f"{plugin}: the implementation of {kind} type '{type_name}' must subclass "
                f"{base.__module__}.{base.__qualname__}"
            )
        registry.add(
            PluginType(kind, type_name, config_model, implementation, plugin, distribution)
        )

    return register


def _check_target_model(plugin: str, type_name: str, config_model: type[BaseModel] | None) -> None:
    """A target model must be tagged ``target_type: Literal["<type_name>"]``.

    The configuration's ``targets`` union is discriminated by that tag; a model tagged with
    another name (or not at all) would make every configuration using the type fail with a
    message that blames the configuration instead of the plugin.
    """
    from typing import Literal, get_args, get_origin

    from mercure.targets import TargetConfig

    if config_model is None or not issubclass(config_model, TargetConfig):
        raise PluginRegistrationError(
            f"{plugin}: the config model of target type '{type_name}' must subclass "
            "mercure.targets.TargetConfig"
        )
    field = config_model.model_fields.get("target_type")
    annotation = field.annotation if field is not None else None
    if get_origin(annotation) is not Literal or get_args(annotation) != (type_name,):
        raise PluginRegistrationError(
            f"{plugin}: the config model {config_model.__qualname__} of target type "
            f"'{type_name}' must declare target_type: Literal[{type_name!r}] "
            f"(it declares {annotation!r})"
        )
