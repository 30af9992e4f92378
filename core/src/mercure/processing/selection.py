"""Which runner runs the modules, and the configuration checks that depend on it.

``process_runner`` names a runner instance (mercure's field: ``docker``, ``nomad``; its
settings in ``plugins.runners.<name>``). Empty means ``local``, the built-in runner, which
exists even when nothing configures it. Instances are created once per process, with only
their own settings, and closed on shutdown.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from mercure.logs import get_logger
from mercure.plugin_settings import PluginInstance
from mercure.runners import Runner, RunnerError

if TYPE_CHECKING:
    from mercure.config import Config, Module
    from mercure.lifecycle import PluginContext
    from mercure.plugins import PluginManager
    from mercure.registry import Registry

DEFAULT_RUNNER = "local"
log = get_logger("mercure.processor")


def runner_name(config: Config) -> str:
    """The runner instance that runs new module runs."""
    return config.process_runner or DEFAULT_RUNNER


def runner_instance(config: Config, registry: Registry, name: str) -> PluginInstance | None:
    """The configured instance called ``name``; the built-in ``local`` one if not configured."""
    for inst in config.plugin_instances("runner"):
        if inst.name == name:
            return inst
    if name == DEFAULT_RUNNER and DEFAULT_RUNNER in registry.names("runner"):
        model = registry.get("runner", DEFAULT_RUNNER).config_model
        settings = model.model_validate({}) if model is not None else None
        if settings is not None:
            return PluginInstance("runner", DEFAULT_RUNNER, DEFAULT_RUNNER, settings)
    return None


def parse_environment(value: str | None) -> dict[str, str]:
    """mercure's ``environment`` of a module: a JSON object of variable names to values."""
    if not value or not value.strip():
        return {}
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"must be a JSON object of variables: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object of variable names to values")
    return {str(k): str(v) for k, v in data.items()}


def module_checks(config: Config, registry: Registry) -> tuple[list[tuple[str, str]], list[str]]:
    """Errors and warnings of the modules that enabled ``process``/``both`` rules use.

    Configured runner instances check every module themselves (``Runner.check_module``, in
    :mod:`mercure.config`). This adds what no runner checks (a module's ``environment`` must
    be mercure's JSON object) and, when no runner is configured, asks the built-in ``local``
    runner about the modules it would run. A mercure configuration has container modules
    (``docker_tag``) and often an empty ``process_runner`` (mercure then uses Docker): it
    still loads with the core alone, with a warning naming what to install, and the jobs of
    such a module fail with that reason until then.
    """
    used: dict[str, list[str]] = {}
    for rule_name, rule in config.rules.items():
        if rule.disabled or rule.action not in ("process", "both"):
            continue
        for module in rule.modules:
            if module in config.modules:
                used.setdefault(module, []).append(rule_name)
    errors: list[tuple[str, str]] = []
    warnings: list[str] = []
    for name in used:
        try:
            parse_environment(config.modules[name].environment)
        except ValueError as exc:
            errors.append((f"modules.{name}.environment", str(exc)))
    name_of_runner = runner_name(config)
    if any(inst.name == name_of_runner for inst in config.plugin_instances("runner")):
        return errors, warnings  # a configured instance: it checked every module already
    inst = runner_instance(config, registry, name_of_runner)
    if inst is None:
        return errors, warnings  # an unknown process_runner is reported on its own
    impl = registry.get("runner", inst.type_name).implementation
    for name, rules in used.items():
        definition: Module = config.modules[name]
        if definition.docker_tag and not definition.command:
            warnings.append(
                f"modules.{name}: a container module (docker_tag {definition.docker_tag!r}) and "
                "process_runner is empty, so the built-in local runner would run it, which "
                "needs a command; jobs of rule(s) " + ", ".join(rules) + " fail until "
                'process_runner is "docker" (pip install mercure-runner-docker)'
            )
            continue
        for field, message in impl.check_module(inst.settings, name, definition):
            errors.append((f"modules.{name}.{field}", message))
    return errors, warnings


class Runners:
    """The runner instances of one process, created and started on first use."""

    def __init__(self, config: Config, plugins: PluginManager, context: Any) -> None:
        self.config = config
        self.plugins = plugins
        self._context = context  # (kind, name) -> PluginContext
        self._made: dict[str, Runner[Any]] = {}
        self._lock = threading.Lock()

    @property
    def default_name(self) -> str:
        return runner_name(self.config)

    def get(self, name: str) -> Runner[Any]:
        """The instance called ``name``; :class:`RunnerError` if it is not configured."""
        with self._lock:
            existing = self._made.get(name)
            if existing is not None:
                return existing
            inst = runner_instance(self.config, self.plugins.registry, name)
            if inst is None:
                raise RunnerError(
                    f"runner '{name}' is not configured (process_runner or plugins.runners); "
                    "configure it again to follow the runs it started"
                )
            impl = self.plugins.registry.get("runner", inst.type_name).implementation
            context: PluginContext = self._context("runner", name)
            runner: Runner[Any] = impl(name, inst.settings, context)
            runner.start()
            self._made[name] = runner
            return runner

    def close(self) -> None:
        with self._lock:
            for name, runner in self._made.items():
                try:
                    runner.close()
                except Exception as exc:
                    log.warning("closing runner failed", runner=name, error=str(exc))
            self._made.clear()


__all__ = [
    "DEFAULT_RUNNER",
    "Runners",
    "module_checks",
    "parse_environment",
    "runner_instance",
    "runner_name",
]
