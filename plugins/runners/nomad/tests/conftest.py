"""Fixtures of the nomad runner's tests: the Nomad stand-in, runners, prepared runs.

* ``standin``: the HTTP stand-in for Nomad (``nomad_standin``) on a free loopback port, with
  two client nodes; every task it started is killed afterwards.
* ``shared``: the folder the router and the "Nomad clients" share. The router sees it at
  ``shared.router``; the clients see the same folder at ``shared.client``, a symbolic link
  (a different path, as on a real cluster mounting NFS elsewhere), so every test goes
  through the ``shared_folders`` mapping.
* ``make_runner``: started runners pointed at the stand-in, closed after the test.
* ``prepared``: a ``ProcessingRun`` with input (a file and ``task.json``), output and run
  folders under ``shared.router``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The tests import their helpers from this folder (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from mercure.config import Module
from mercure.lifecycle import PluginContext
from mercure.runners import ProcessingRun
from mercure_runner_nomad import NomadRunner, NomadRunnerSettings
from nomad_standin import NomadStandIn, running_standin
from nomad_testing import Shared
from standin_cluster import Node


@pytest.fixture
def shared(tmp_path: Path) -> Shared:
    router = tmp_path / "shared-on-router"
    router.mkdir()
    client = tmp_path / "shared-on-clients"
    client.symlink_to(router, target_is_directory=True)
    return Shared(router.resolve(), client)


@pytest.fixture
def standin() -> Iterator[NomadStandIn]:
    with running_standin(nodes=[Node("client-1"), Node("client-2")]) as server:
        yield server


@pytest.fixture
def make_runner(standin: NomadStandIn, shared: Shared) -> Iterator[Callable[..., NomadRunner]]:
    made: list[NomadRunner] = []

    def make(**settings: Any) -> NomadRunner:
        values: dict[str, Any] = {
            "address": standin.address,
            "shared_folders": {str(shared.router): str(shared.client)},
            "poll_interval": 0.05,
            "kill_timeout": 1.0,
        }
        values.update(settings)
        runner = NomadRunner(
            "nomad", NomadRunnerSettings.model_validate(values), PluginContext("runner", "nomad")
        )
        runner.start()
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


@pytest.fixture
def prepared(shared: Shared) -> Callable[..., ProcessingRun]:
    def make(image: str, name: str = "mod", step: int = 0, **module: Any) -> ProcessingRun:
        root = shared.router / "processing" / f"task-{name}" / "work" / str(step)
        for sub in ("in", "out", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "in" / "1.2.3#a.dcm").write_bytes(b"not really DICOM")
        (root / "in" / "task.json").write_text(json.dumps({"id": f"task-{name}"}))
        run_fields = {k: module.pop(k) for k in ("persistence_folder", "allow_root") if k in module}
        return ProcessingRun(
            task_id=f"task-{name}",
            module_name=name,
            module=Module(docker_tag=image, **module),
            input_folder=root / "in",
            output_folder=root / "out",
            settings={},
            step=step,
            run_id=f"task-{name}-a1-s{step}",
            run_folder=root / "run",
            **run_fields,
        )

    return make
