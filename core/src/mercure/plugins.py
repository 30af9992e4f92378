"""The plugin manager: loads entry-point plugins, site plugins and the built-ins.

Order: plugins from the ``mercure`` entry-point group first, then ``.py`` files from the site
plugin folder, then the built-ins. Environment variables control autoloading:

* ``MERCURE_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry-point plugins (built-ins only);
* ``MERCURE_PLUGINS=dist-a,dist-b`` loads only entry points of the named distributions.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from mercure import PROJECT_NAME, __version__, hookspecs
from mercure.metrics import MetricsSink
from mercure.monitors import Monitor
from mercure.notifiers import Notifier
from mercure.plugin_services import PluginService
from mercure.receivers import Receiver
from mercure.registry import Kind, PluginRegistrationError, Registry, make_register
from mercure.runners import Runner
from mercure.targets import Target

ENTRY_POINT_GROUP = PROJECT_NAME
ENV_DISABLE_AUTOLOAD = "MERCURE_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "MERCURE_PLUGINS"
CORE_DISTRIBUTION = "mercure-core"

BUILTIN_MODULES = (
    "mercure.builtin.dicom_receiver",
    "mercure.builtin.folder_target",
    "mercure.builtin.dummy_target",
    "mercure.builtin.local_runner",
    "mercure.builtin.log_notifier",
    "mercure.builtin.log_metrics",
)

_REGISTRATION_HOOKS: dict[Kind, tuple[str, type]] = {
    "target": ("register_targets", Target),
    "receiver": ("register_receivers", Receiver),
    "runner": ("register_runners", Runner),
    "notifier": ("register_notifiers", Notifier),
    "metrics_sink": ("register_metrics_sinks", MetricsSink),
    "monitor": ("register_monitors", Monitor),
    "service": ("register_services", PluginService),
}


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, where it came from, and its version."""

    name: str
    distribution: str
    version: str
    source: str  # "entry point", "site", "built-in" or "registered"


class PluginManager:
    """A pluggy manager plus the registry of types its plugins registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registry: Registry | None = None
        self._callers: dict[tuple[str, str], Any] = {}

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str = "(registered in code)",
        version: str = "",
        source: str = "registered",
    ) -> str:
        """Register a plugin object or module; invalidates the type registry."""
        registered = self.pm.register(plugin, name=name)
        if registered is None:
            raise PluginRegistrationError(f"plugin {name or plugin!r} is blocked or invalid")
        self.infos[registered] = PluginInfo(registered, distribution, version, source)
        self._registry = None
        self._callers.clear()
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._registry = None
        self._callers.clear()

    def load_entry_points(self, allow: Iterable[str] | None = None) -> None:
        allowed = {_normalize(a) for a in allow} if allow is not None else None
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist_name = ep.dist.name if ep.dist is not None else "(unknown distribution)"
            dist_version = ep.dist.version if ep.dist is not None else ""
            if allowed is not None and _normalize(dist_name) not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginRegistrationError(
                    f"plugin '{ep.name}' from {dist_name} {dist_version} failed to import: "
                    f"{exc.__class__.__name__}: {exc}; reinstall or uninstall {dist_name}"
                ) from exc
            self.register(
                module, ep.name, distribution=dist_name, version=dist_version, source="entry point"
            )

    def load_site_plugins(self, folder: Path) -> None:
        """Register every ``*.py`` file in ``folder`` as a plugin named ``site_<stem>``."""
        if not folder.is_dir():
            raise PluginRegistrationError(
                f"site plugin folder {folder} does not exist; create it or remove plugin_folder"
            )
        for path in sorted(folder.glob("*.py")):
            name = f"site_{path.stem}"
            if self.pm.has_plugin(name):
                continue
            module = _import_file(name, path)
            self.register(module, name, distribution=f"site file {path}", source="site")

    def load_builtins(self) -> None:
        for module_name in BUILTIN_MODULES:
            short = "builtin_" + module_name.rsplit(".", 1)[1]
            if self.pm.has_plugin(short):
                continue
            module = importlib.import_module(module_name)
            self.register(
                module,
                short,
                distribution=CORE_DISTRIBUTION,
                version=__version__,
                source="built-in",
            )

    def check(self) -> None:
        """Fail on hook implementations whose name matches no hookspec (a misspelled hook)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginRegistrationError(f"{exc}; check the hook's spelling") from exc

    @property
    def registry(self) -> Registry:
        """The types registered by all plugins (built on first use)."""
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry

    def _build_registry(self) -> Registry:
        registry = Registry()
        for kind, (hook_name, base) in _REGISTRATION_HOOKS.items():
            hook_caller = getattr(self.pm.hook, hook_name)
            # Call each implementation on its own so that what it registers is attributed to it.
            for impl in reversed(hook_caller.get_hookimpls()):
                if _is_wrapper(impl):
                    continue
                info = self.infos.get(impl.plugin_name)
                distribution = info.distribution if info else impl.plugin_name
                register = make_register(registry, kind, impl.plugin_name, distribution, base)
                self._caller(hook_name, impl.plugin_name)(register=register)
        return registry

    def _caller(self, hook_name: str, plugin_name: str) -> Any:
        """A pluggy hook caller for one plugin's implementation plus every hook wrapper.

        Registration hooks are called one plugin at a time (so that what a plugin registers
        is attributed to it) and observers one at a time (so that one that raises does not
        keep the others from being called), but always through pluggy's own machinery:
        hook wrappers, ``pm.trace`` and ``add_hookcall_monitoring`` see every call.
        """
        key = (hook_name, plugin_name)
        caller = self._callers.get(key)
        if caller is None:
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            keep = {id(i.plugin) for i in impls if _is_wrapper(i) or i.plugin_name == plugin_name}
            remove = [p for _, p in self.pm.list_name_plugin() if id(p) not in keep]
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=remove)
            self._callers[key] = caller
        return caller

    def plugin_types(self, plugin_name: str) -> list[str]:
        return [f"{t.kind}:{t.name}" for t in self.registry if t.plugin == plugin_name]

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Broadcast an observer hook; an observer that raises is logged, never propagated."""
        from mercure.logs import get_logger

        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if _is_wrapper(impl):
                continue
            try:
                self._caller(hook_name, impl.plugin_name)(**kwargs)
            except Exception as exc:
                get_logger(__name__).warning(
                    "observer failed", hook=hook_name, plugin=impl.plugin_name, error=repr(exc)
                )


def _normalize(dist_name: str) -> str:
    """A distribution name as pip compares them: ``Mercure_Target.X`` is ``mercure-target-x``."""
    return re.sub(r"[-_.]+", "-", dist_name.strip()).lower()


def _is_wrapper(impl: Any) -> bool:
    return bool(getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False))


def _import_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginRegistrationError(f"cannot import site plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PluginRegistrationError(
            f"site plugin {path} failed to import: {exc.__class__.__name__}: {exc}"
        ) from exc
    return module


def build_plugin_manager(
    site_folder: Path | None = None, *, autoload: bool | None = None
) -> PluginManager:
    """Build the manager the services and the CLI use: entry points, site plugins, built-ins."""
    manager = PluginManager()
    if autoload is None:
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in ("1", "true", "yes")
    if autoload:
        allow_env = os.environ.get(ENV_ALLOW)
        # Set but empty means "no entry-point plugins", as llm's LLM_LOAD_PLUGINS.
        allow = [a for a in allow_env.split(",") if a.strip()] if allow_env is not None else None
        manager.load_entry_points(allow)
    if site_folder is not None:
        manager.load_site_plugins(site_folder)
    manager.load_builtins()
    manager.check()
    return manager
