"""A module's ``docker_arguments``, ``additional_volumes`` and ``pull_policy``, checked.

mercure writes both as JSON text in the module's definition: ``docker_arguments`` is an
object of the docker SDK's ``containers.run`` keyword arguments, ``additional_volumes`` an
object ``{"<host folder>": {"bind": "<container folder>", "mode": "ro"}}``. The same checks
run when the configuration loads (:meth:`DockerRunner.check_module`, each problem reported
at its field) and again before every run, where a volume's real path (after symbolic links)
must still be below an allowed base folder.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import TYPE_CHECKING, Any, get_args

from mercure.runners import CONTAINER_IN_DIR, CONTAINER_OUT_DIR, CONTAINER_PERSISTENCE_DIR

from mercure_runner_docker.settings import RESERVED_ARGUMENTS, DockerRunnerSettings, PullPolicy

if TYPE_CHECKING:
    from mercure.config import Module

Problems = list[tuple[str, str]]
CONTAINER_FOLDERS = (CONTAINER_IN_DIR, CONTAINER_OUT_DIR, CONTAINER_PERSISTENCE_DIR)
VOLUME_MODES = ("ro", "rw")


def _json_object(text: str | None, field: str) -> tuple[dict[str, Any], Problems]:
    if text is None or not str(text).strip():
        return {}, []
    try:
        value = json.loads(text)
    except ValueError as exc:
        return {}, [(field, f"must be a JSON object: {exc}")]
    if not isinstance(value, dict):
        return {}, [(field, f"must be a JSON object, not {type(value).__name__}")]
    return value, []


def docker_arguments(
    module: Module, settings: DockerRunnerSettings
) -> tuple[dict[str, Any], Problems]:
    """The module's docker arguments and the problems with them (``docker_arguments``)."""
    field = "docker_arguments"
    arguments, problems = _json_object(module.docker_arguments, field)
    allowed = set(settings.allowed_docker_arguments)
    for key in arguments:
        if key in RESERVED_ARGUMENTS:
            problems.append(
                (field, f"{key}: set by the docker runner itself; a module cannot choose it")
            )
        elif key not in allowed:
            problems.append(
                (
                    field,
                    f"{key}: not an allowed docker argument (allowed: "
                    f"{', '.join(sorted(allowed))}); an operator may add it to "
                    "plugins.runners.<name>.allowed_docker_arguments",
                )
            )
    return {k: v for k, v in arguments.items() if k in allowed}, problems


def _below(path: str, bases: list[str]) -> bool:
    for base in bases:
        base = posixpath.normpath(base)
        if path == base or path.startswith(base.rstrip("/") + "/"):
            return True
    return False


def additional_volumes(
    module: Module, settings: DockerRunnerSettings, *, resolve: bool = False
) -> tuple[dict[str, dict[str, str]], Problems]:
    """The module's extra bind mounts ``{host: {bind, mode}}`` and the problems with them.

    ``resolve`` also follows symbolic links on this host (before a run): a link below an
    allowed folder that points elsewhere is refused.
    """
    field = "additional_volumes"
    raw, problems = _json_object(module.additional_volumes, field)
    volumes: dict[str, dict[str, str]] = {}
    bases = settings.volume_bases
    for host, spec in raw.items():
        if not isinstance(host, str) or not host.startswith("/"):
            problems.append((field, f"{host!r}: the host folder must be an absolute path"))
            continue
        normal = posixpath.normpath(host)
        if ".." in host.split("/") or not _below(normal, bases):
            problems.append(
                (
                    field,
                    f"{host}: not below an allowed folder ({', '.join(bases) or 'none'}); "
                    "an operator may add one to plugins.runners.<name>.volume_bases",
                )
            )
            continue
        if resolve:
            real = os.path.realpath(normal)
            if not _below(real, [os.path.realpath(b) for b in bases]):
                problems.append(
                    (field, f"{host}: leads to {real}, which is not below an allowed folder")
                )
                continue
        if isinstance(spec, str):
            spec = {"bind": spec}
        if not isinstance(spec, dict):
            problems.append((field, f"{host}: must be an object with 'bind' and 'mode'"))
            continue
        bind = spec.get("bind")
        mode = spec.get("mode", "rw")
        if not isinstance(bind, str) or not bind.startswith("/"):
            problems.append((field, f"{host}: 'bind' must be an absolute folder in the container"))
            continue
        target = posixpath.normpath(bind)
        if (
            any(
                target == f or target.startswith(f + "/") or f.startswith(target + "/")
                for f in CONTAINER_FOLDERS
            )
            or target == "/"
        ):
            problems.append((field, f"{host}: 'bind' {bind} overlaps mercure's own folders"))
            continue
        if mode not in VOLUME_MODES:
            problems.append((field, f"{host}: 'mode' must be one of {', '.join(VOLUME_MODES)}"))
            continue
        volumes[normal] = {"bind": target, "mode": str(mode)}
    return volumes, problems


def pull_policy(module: Module, settings: DockerRunnerSettings) -> tuple[PullPolicy, Problems]:
    """The module's own ``pull_policy`` (an addition of this project), else the runner's."""
    value = (module.model_extra or {}).get("pull_policy")
    if value is None or value == "":
        return settings.pull_policy, []
    choices = get_args(PullPolicy)
    if value not in choices:
        return settings.pull_policy, [("pull_policy", f"must be one of {', '.join(choices)}")]
    return value, []


def module_problems(module: Module, settings: DockerRunnerSettings) -> Problems:
    """Everything wrong with a module for this runner, as ``(field, message)`` pairs."""
    problems: Problems = []
    if not module.docker_tag:
        hint = " (it has a command: that is what the local runner runs)" if module.command else ""
        problems.append(("docker_tag", f"the docker runner runs a module's docker_tag{hint}"))
    problems += docker_arguments(module, settings)[1]
    problems += additional_volumes(module, settings)[1]
    problems += pull_policy(module, settings)[1]
    return problems


__all__ = ["additional_volumes", "docker_arguments", "module_problems", "pull_policy"]
