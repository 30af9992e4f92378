"""Loading and checking mercure's configuration (``mercure.json``); the models are in
:mod:`mercure.config_models` and are re-exported here.

Field names, defaults and meaning are mercure's, so an existing ``mercure.json`` loads
unchanged. The ``targets`` section is validated against the target types that the installed
plugins registered: each ``target_type`` selects its plugin's model, and a type that no plugin
provides fails with the distribution to install. Fields this project adds all have defaults.

Secrets (passwords, keys, tokens) may be written as ``"${env:NAME}"`` or ``"${file:/path}"``
instead of plaintext; they are resolved when the configuration loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
)

from mercure.config_models import (
    DEFAULT_MODULE_TIMEOUT,
    Config,
    DicomReceiverConfig,
    Module,
    ProcessingLogsConfig,
    ReceiverTLSConfig,
    Rule,
)
from mercure.plugin_settings import PluginInstance, resolve_plugin_instances

if TYPE_CHECKING:
    from mercure.registry import Registry

__all__ = [
    "DEFAULT_MODULE_TIMEOUT",
    "Config",
    "ConfigError",
    "DicomReceiverConfig",
    "Module",
    "ProcessingLogsConfig",
    "ReceiverTLSConfig",
    "Rule",
    "default_config_data",
    "load_config",
    "validate_config",
]


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds ``(json_path, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {message}" for path, message in errors)
        super().__init__(f"configuration {source} has {len(errors)} error(s):\n{lines}")


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(root)"


_MISSING = object()


def _json_loc(loc: tuple[int | str, ...], data: Any) -> tuple[int | str, ...]:
    """``loc`` without the union-member tags pydantic inserts (``str``, ``list[str]``, ...).

    Walks the input alongside: a loc item is a key of a dict or an index of a list in the
    data; anything else (below a scalar value) names a union member, not a JSON path step.
    """
    path: list[int | str] = []
    node: Any = data
    for item in loc:
        if isinstance(node, dict):
            path.append(item)
            node = node.get(item, _MISSING) if isinstance(item, str) else _MISSING
        elif isinstance(node, list) and isinstance(item, int):
            path.append(item)
            node = node[item] if 0 <= item < len(node) else _MISSING
        elif node is _MISSING:
            path.append(item)
    return tuple(path)


#: mercure parses a target without ``target_type`` as the first of these whose fields it fits.
UNTYPED_TARGET_ORDER = (
    "dicom", "dicomtls", "dicomweb", "sftp", "rsync", "xnat", "s3", "folder", "dummy"
)  # fmt: skip


def _untyped_target_type(target: Mapping[str, Any], registry: Registry) -> str:
    """The type mercure would give a target written without ``target_type``.

    Tried in mercure's order among the installed types; when none fits, ``dicom`` (the type
    of mercure's oldest configurations), so that the errors are reported against it.
    """
    for type_name in UNTYPED_TARGET_ORDER:
        if type_name not in registry.names("target"):
            continue
        model = registry.get("target", type_name).config_model
        if model is None:
            continue
        try:
            model.model_validate({**target, "target_type": type_name})
        except ValidationError:
            continue
        return type_name
    return "dicom"


def _config_model(registry: Registry) -> type[Config]:
    """A Config subclass whose ``targets`` is the tagged union of the registered target models."""
    models = registry.config_models("target")
    if not models:
        return Config
    union: Any = models[0] if len(models) == 1 else Union[tuple(models)]  # noqa: UP007
    if len(models) > 1:
        union = Annotated[union, Field(discriminator="target_type")]
    model: type[Config] = create_model(
        "PluginConfig", __base__=Config, targets=(dict[str, union], {})
    )
    return model


def validate_config(
    data: Mapping[str, Any], registry: Registry, source: str = "(in memory)"
) -> tuple[Config, list[str]]:
    """Validate a parsed ``mercure.json``; return the config and a list of warnings.

    Raises :class:`ConfigError` listing every error with its JSON path.
    """
    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    raw = dict(data)

    targets = raw.get("targets", {})
    known_types = set(registry.names("target"))
    if isinstance(targets, dict):
        cleaned_targets: dict[str, Any] = {}
        for name, target in targets.items():
            if isinstance(target, dict) and "target_type" not in target:
                target = {**target, "target_type": _untyped_target_type(target, registry)}
            ttype = target.get("target_type") if isinstance(target, dict) else None
            if isinstance(ttype, str) and ttype not in known_types:
                from mercure.registry import UnknownTypeError

                errors.append(
                    (
                        f"targets.{name}.target_type",
                        str(UnknownTypeError("target", ttype, sorted(known_types))),
                    )
                )
                continue
            cleaned_targets[name] = target
        raw["targets"] = cleaned_targets

    model = _config_model(registry)
    config: Config | None = None
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        by_path: dict[str, list[str]] = {}
        for err in exc.errors():
            loc = tuple(err["loc"])
            # Drop the union tag pydantic inserts after the target name.
            if len(loc) >= 3 and loc[0] == "targets" and loc[2] in known_types:
                loc = loc[:2] + loc[3:]
            messages = by_path.setdefault(_loc_to_path(_json_loc(loc, raw)), [])
            if err["msg"] not in messages:
                messages.append(err["msg"])
        # A value that matches no member of a union (``target: str | list[str]``) gets one
        # error per member; report it once, at its JSON path.
        errors.extend((path, " or ".join(msgs)) for path, msgs in by_path.items())

    instances, instance_errors, instance_warnings = resolve_plugin_instances(raw, registry)
    errors.extend(instance_errors)
    warnings.extend(instance_warnings)
    if config is not None:
        errors.extend(_check_references(config, registry))
        errors.extend(_check_studies_and_times(config))
        errors.extend(_check_modules(config, registry, instances.get("runner", [])))
        config._instances = dict(instances)
        from mercure.processing.selection import module_checks

        module_errors, module_warnings = module_checks(config, registry)
        errors.extend(module_errors)
        warnings.extend(module_warnings)
        unknown_errors, unknown_warnings = _unknown_keys(config)
        errors.extend(unknown_errors)
        warnings.extend(unknown_warnings)
        warnings.extend(_warnings(config))
    if errors:
        raise ConfigError(source, errors)
    assert config is not None
    return config, warnings


def _check_modules(
    config: Config, registry: Registry, runners: list[PluginInstance]
) -> list[tuple[str, str]]:
    """Ask each configured runner about every module (``Runner.check_module``)."""
    errors: list[tuple[str, str]] = []
    for runner in runners:
        impl = registry.get("runner", runner.type_name).implementation
        for name, module in config.modules.items():
            try:
                found = impl.check_module(runner.settings, name, module)
            except Exception as exc:  # a plugin bug must not hide the configuration's errors
                found = [("", f"runner '{runner.name}' could not check it: {exc}")]
            for field, message in found:
                path = f"modules.{name}.{field}" if field else f"modules.{name}"
                errors.append((path, f"{message} (runner '{runner.name}')"))
    return errors


def _check_references(config: Config, registry: Registry) -> list[tuple[str, str]]:
    """Rules must parse and name existing targets and modules."""
    from mercure.rules import RuleError, compile_rule

    errors: list[tuple[str, str]] = []
    for name, rule in config.rules.items():
        try:
            compile_rule(rule.rule)
        except RuleError as exc:
            errors.append((f"rules.{name}.rule", str(exc)))
        if rule.action in ("route", "both"):
            for target in rule.targets:
                if target not in config.targets:
                    errors.append(
                        (
                            f"rules.{name}.target",
                            f"target '{target}' is not defined in 'targets' "
                            f"(defined: {', '.join(sorted(config.targets)) or 'none'})",
                        )
                    )
            if not rule.targets and not rule.disabled:
                errors.append((f"rules.{name}.target", f"action '{rule.action}' needs a target"))
        if rule.action in ("process", "both"):
            if not rule.modules and not rule.disabled:
                errors.append(
                    (
                        f"rules.{name}.processing_module",
                        f"action '{rule.action}' needs a processing module",
                    )
                )
            for module in rule.modules:
                if module not in config.modules:
                    errors.append(
                        (
                            f"rules.{name}.processing_module",
                            f"module '{module}' is not defined in 'modules'",
                        )
                    )
    configured_runners = config.plugins.get("runners", {})
    if (
        config.process_runner
        and config.process_runner not in registry.names("runner")
        and config.process_runner not in configured_runners  # an instance; its type is checked
    ):
        from mercure.registry import UnknownTypeError

        errors.append(
            (
                "process_runner",
                str(UnknownTypeError("runner", config.process_runner, registry.names("runner"))),
            )
        )
    return errors


def _unknown_keys(config: Config) -> tuple[list[tuple[str, str]], list[str]]:
    """Keys no model knows: an error when it looks like a misspelling, else a warning.

    mercure's own models accept unknown keys in these sections (newer mercure versions add
    fields), so an unrelated key only warns; but ``notification_trigger_eror`` would silently
    leave the real setting at its default, so a key close to a known one is an error.
    """
    import difflib

    errors: list[tuple[str, str]] = []
    warnings: list[str] = []

    def check(path: str, model: BaseModel) -> None:
        known = list(type(model).model_fields)
        for key in sorted(model.model_extra or {}):
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close:
                errors.append((where, f"unknown setting; did you mean '{close[0]}'?"))
            else:
                warnings.append(f"{where}: unknown setting, ignored")

    check("", config)
    check("dicom_receiver", config.dicom_receiver)
    check("processing_logs", config.processing_logs)
    for name, rule in config.rules.items():
        check(f"rules.{name}", rule)
    for name, module in config.modules.items():
        check(f"modules.{name}", module)
    return errors, warnings


def _warnings(config: Config) -> list[str]:
    from mercure.rules import rule_warnings

    warnings: list[str] = []
    for name, target in config.targets.items():
        if target.target_type == "dummy" and not config.features.get("dummy_target", False):
            warnings.append(
                f"targets.{name}: a dummy target delivers nothing (its jobs succeed at once); "
                "mercure offers the type only with features.dummy_target: true"
            )
    for name, rule in config.rules.items():
        warnings.extend(f"rules.{name}.rule: {text}" for text in rule_warnings(rule.rule))
    for name, rule in config.rules.items():
        if rule.disabled or rule.action_trigger != "study":
            continue
        if (
            rule.study_trigger_condition == "received_series"
            and not rule.study_trigger_series.strip()
        ):
            warnings.append(
                f"rules.{name}.study_trigger_series: empty, so the study completes by timeout "
                "(study_complete_trigger), as in mercure"
            )
    return warnings


def _check_studies_and_times(config: Config) -> list[tuple[str, str]]:
    """Study triggers of study rules and the off-peak window must be readable.

    mercure checks a ``study_trigger_series`` only in its web editor and evaluates a broken one
    as never complete; here it is refused when the configuration loads, with its column.
    """
    from mercure.priorities import config_errors
    from mercure.study_trigger import check_completion_series

    errors = config_errors(config)
    for name, rule in config.rules.items():
        if rule.disabled or rule.action_trigger != "study":
            continue
        series = rule.study_trigger_series
        if rule.study_trigger_condition == "received_series" and series.strip():
            problem = check_completion_series(series)
            if problem is not None:
                errors.append((f"rules.{name}.study_trigger_series", problem))
    return errors


def load_config(path: Path, registry: Registry) -> tuple[Config, list[str]]:
    """Read and validate a ``mercure.json`` file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            str(path), [("(file)", f"not valid JSON: {exc.msg} at line {exc.lineno}:{exc.colno}")]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("(root)", "must be a JSON object")])
    return validate_config(data, registry, str(path))


def default_config_data(data_folder: Path) -> dict[str, Any]:
    """A working configuration: receive on 11112, route everything to a folder target."""
    data_folder = data_folder.resolve()
    folders = {
        f"{name}_folder": str(data_folder / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    return {
        "appliance_name": "master",
        "port": 11112,
        **folders,
        "series_complete_trigger": 5,
        "retry_delay": 30,
        "retry_max": 5,
        "targets": {
            "local_folder": {
                "target_type": "folder",
                "folder": str(data_folder / "target"),
                "comment": "Everything the router receives ends up here.",
            }
        },
        "rules": {
            "route_all": {
                "rule": "True",
                "target": "local_folder",
                "action": "route",
                "comment": "Route every series to the local folder target.",
            }
        },
    }
