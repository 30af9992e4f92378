"""The parameterized batch job of one module version, and the dispatch of one run.

One job is registered per module version: its id ends in a hash of the whole job body (the
module's image, environment, resources, constraints and the runner's template settings), so a
changed module is a new job and runs already dispatched keep the definition they started
with. Each run is a dispatch of that job whose meta carries the run's folders (as the Nomad
clients see them) and its ``run_id``, which is also the dispatch's idempotency token.

The task mounts the run's folders where mercure mounts them (``/tmp/data``, ``/tmp/output``,
``/tmp/persistence``) and gets mercure's folder variables for those paths, so mercure module
images run unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mercure.runners import (
    CONTAINER_IN_DIR,
    CONTAINER_OUT_DIR,
    CONTAINER_PERSISTENCE_DIR,
    ProcessingRun,
    folder_environment,
)

from mercure_runner_nomad.hcl import parse_constraints, parse_resources
from mercure_runner_nomad.settings import NomadRunnerSettings

GROUP = "module"
TASK = "module"
SECOND_NS = 1_000_000_000
#: Dispatch meta keys (``NOMAD_META_<key>`` inside the job).
META_IN = "mercure_in"
META_OUT = "mercure_out"
META_PERSISTENCE = "mercure_persistence"
META_RUN_ID = "mercure_run_id"
META_TASK_ID = "mercure_task_id"
META_STEP = "mercure_step"
#: Meta of the registered job.
META_MODULE = "mercure_module"
META_DEFINITION = "mercure_definition"


@dataclass(frozen=True)
class JobSpec:
    """A module version's registered job: its id and the body for ``/v1/jobs``."""

    job_id: str
    body: dict[str, Any]
    definition_hash: str


def _safe(name: str, limit: int = 40) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "module"
    return cleaned[:limit]


def _mounts(settings: NomadRunnerSettings, persistence: bool) -> dict[str, Any]:
    """The driver's mounts of the run's folders, from the dispatch's meta."""
    pairs = [(META_IN, CONTAINER_IN_DIR), (META_OUT, CONTAINER_OUT_DIR)]
    if persistence:
        pairs.append((META_PERSISTENCE, CONTAINER_PERSISTENCE_DIR))
    if settings.driver == "docker":
        # mount blocks, not volumes: Docker refuses a bind source that does not exist
        # instead of creating an empty folder on the client (a wrong shared_folders mapping
        # then fails the run loudly).
        return {
            "mount": [
                {
                    "type": "bind",
                    "source": "${NOMAD_META_" + key + "}",
                    "target": target,
                    "readonly": False,
                }
                for key, target in pairs
            ]
        }
    return {"volumes": ["${NOMAD_META_" + key + "}:" + target for key, target in pairs]}


def build_job(settings: NomadRunnerSettings, run: ProcessingRun) -> JobSpec:
    """The parameterized job for ``run``'s module (``ValueError``: a bad snippet)."""
    module = run.module
    persistence = bool(module.requires_persistence)
    config: dict[str, Any] = {**settings.task_config, "image": module.docker_tag or ""}
    config.update(_mounts(settings, persistence))
    if not module.network_enabled:
        config["network_mode"] = "none"
    env = dict(settings.environment)
    env.update(run.environment)
    env.update(folder_environment(CONTAINER_IN_DIR, CONTAINER_OUT_DIR))
    if persistence:
        env["MODULE_PERSISTENCE_DIR"] = CONTAINER_PERSISTENCE_DIR
    resources: dict[str, Any] = {"CPU": settings.default_cpu, "MemoryMB": settings.default_memory}
    custom = parse_resources(module.resources)
    if "Cores" in custom:
        resources.pop("CPU")
    resources.update(custom)
    job_constraints, job_affinities = parse_constraints(settings.constraints)
    mod_constraints, mod_affinities = parse_constraints(module.constraints)
    user = "root" if module.requires_root else settings.task_user()
    task: dict[str, Any] = {
        "Name": TASK,
        "Driver": settings.driver,
        "User": user,
        "Config": config,
        "Env": env,
        "Resources": resources,
        "KillTimeout": int(settings.kill_timeout * SECOND_NS),
        "LogConfig": {"MaxFiles": 10, "MaxFileSizeMB": 10},
    }
    required = [META_IN, META_OUT, META_RUN_ID] + ([META_PERSISTENCE] if persistence else [])
    group: dict[str, Any] = {
        "Name": GROUP,
        "Count": 1,
        # A module is started at most once per attempt: no restart, no reschedule.
        "RestartPolicy": {
            "Attempts": 0,
            "Mode": "fail",
            "Interval": 86400 * SECOND_NS,
            "Delay": 15 * SECOND_NS,
        },
        "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
        "Tasks": [task],
    }
    job: dict[str, Any] = {
        "Type": "batch",
        "Namespace": settings.namespace,
        "Datacenters": list(settings.datacenters),
        "Priority": settings.priority,
        "ParameterizedJob": {
            "Payload": "forbidden",
            "MetaRequired": required,
            "MetaOptional": [META_TASK_ID, META_STEP],
        },
        "Constraints": job_constraints + mod_constraints,
        "Affinities": job_affinities + mod_affinities,
        "TaskGroups": [group],
    }
    if settings.region:
        job["Region"] = settings.region
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    job_id = f"{settings.job_prefix}-{_safe(run.module_name)}-{digest}"
    job.update(
        ID=job_id,
        Name=job_id,
        Meta={META_MODULE: run.module_name, META_DEFINITION: digest},
    )
    return JobSpec(job_id=job_id, body={"Job": job}, definition_hash=digest)


def dispatch_body(run: ProcessingRun, folders: dict[str, str]) -> dict[str, Any]:
    """The ``/v1/job/<id>/dispatch`` body of one run; ``folders`` are client paths by key."""
    meta = {
        META_IN: folders[META_IN],
        META_OUT: folders[META_OUT],
        META_RUN_ID: run.run_id,
        META_TASK_ID: run.task_id,
        META_STEP: str(run.step),
    }
    if META_PERSISTENCE in folders:
        meta[META_PERSISTENCE] = folders[META_PERSISTENCE]
    return {"Meta": meta, "IdempotencyToken": run.run_id}


__all__ = [
    "GROUP",
    "META_IN",
    "META_OUT",
    "META_PERSISTENCE",
    "META_RUN_ID",
    "TASK",
    "JobSpec",
    "build_job",
    "dispatch_body",
]
