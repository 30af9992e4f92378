"""mercure runner plugin ``docker``: processing modules run as containers of their ``docker_tag``.

Select it with ``"process_runner": "docker"``; its settings go in ``plugins.runners.docker``
(:class:`~mercure_runner_docker.settings.DockerRunnerSettings`).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_runner_docker.runner import DockerRunner
from mercure_runner_docker.settings import DockerRunnerSettings


@hookimpl
def register_runners(register: RegisterFn) -> None:
    register("docker", DockerRunnerSettings, DockerRunner)


__all__ = ["DockerRunner", "DockerRunnerSettings", "register_runners"]
