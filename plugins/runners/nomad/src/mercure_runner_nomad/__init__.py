"""mercure runner plugin ``nomad``: processing modules as Nomad jobs, through Nomad's HTTP API.

Installed, it registers the runner type ``nomad`` through ``register_runners`` (entry point
``runner_nomad`` in the ``mercure`` group). ``"process_runner": "nomad"`` selects it; its
settings are ``plugins.runners.nomad`` (:class:`NomadRunnerSettings`).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_runner_nomad.runner import NomadRunner
from mercure_runner_nomad.settings import NomadRunnerSettings

__all__ = ["NomadRunner", "NomadRunnerSettings", "register_runners"]


@hookimpl
def register_runners(register: RegisterFn) -> None:
    register("nomad", NomadRunnerSettings, NomadRunner)
