"""The ``nomad`` runner: each module run is a dispatch of a parameterized batch job.

``launch`` registers the module's job once per module version (:mod:`.jobspec`) and
dispatches it with the run's folders and ``run_id`` as meta; ``run_id`` is also the
dispatch's idempotency token, and the dispatched job's id is written to the run's folder, so
a processor that died before it persisted the handle finds the same dispatch again. The
handle (the dispatched job's id, namespace and region) can be followed from any router
host. ``wait`` reads the job's allocations until one ended and turns Nomad's account of it
into the outcome (:mod:`.outcome`), with the task's stdout and stderr fetched through the
API; a job Nomad does not place within ``placement_timeout`` fails with Nomad's placement
failure and is stopped. ``cancel`` stops the dispatched job, ``cleanup`` purges it.

Input and output move through a folder the router and the Nomad clients share
(``shared_folders``): the task mounts the run's folders from there.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercure.fsutil import atomic_write_bytes
from mercure.logs import get_logger
from mercure.runners import ProcessingRun, Runner, RunnerError, RunOutcome

from mercure_runner_nomad.api import NomadAPI, NomadError, Scope
from mercure_runner_nomad.hcl import HclError, parse_constraints, parse_resources
from mercure_runner_nomad.jobspec import (
    META_IN,
    META_OUT,
    META_PERSISTENCE,
    TASK,
    JobSpec,
    build_job,
    dispatch_body,
)
from mercure_runner_nomad.outcome import choose, placement_problem, verdict
from mercure_runner_nomad.settings import NomadRunnerSettings

if TYPE_CHECKING:
    from mercure.config import Module
    from mercure.lifecycle import PluginContext

MARKER = "nomad-dispatch.json"
"""In the run's folder: the handle of its dispatch, written as soon as Nomad returned it."""
log = get_logger("mercure.runner.nomad")


class NomadRunner(Runner[NomadRunnerSettings]):
    """Runs modules as Nomad jobs; see the module docstring."""

    def __init__(self, name: str, settings: NomadRunnerSettings, context: PluginContext) -> None:
        super().__init__(name, settings, context)
        self._api: NomadAPI | None = None
        self._lock = threading.Lock()
        self._registered: set[str] = set()

    @classmethod
    def check_module(
        cls, settings: NomadRunnerSettings | None, name: str, module: Module
    ) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if not (module.docker_tag or "").strip():
            errors.append(("docker_tag", "no docker_tag: the nomad runner runs the module's image"))
        if (module.docker_arguments or "").strip():
            errors.append(
                (
                    "docker_arguments",
                    "Nomad's task drivers take no docker run arguments; set driver options "
                    "for every module in plugins.runners.nomad.task_config, resources and "
                    "placement in the module's resources and constraints",
                )
            )
        if (module.additional_volumes or "").strip():
            errors.append(
                (
                    "additional_volumes",
                    "not supported by the nomad runner: a Nomad client mounts only the run's "
                    "folders from the shared folders (and the persistence folder)",
                )
            )
        try:
            parse_resources(module.resources)
        except HclError as exc:
            errors.append(("resources", f"{exc} (the body of Nomad's resources block)"))
        try:
            parse_constraints(module.constraints)
        except HclError as exc:
            errors.append(("constraints", f"{exc} (Nomad constraint/affinity blocks)"))
        return errors

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._client()

    def close(self) -> None:
        # Dispatched jobs keep running in Nomad; a later processor follows them by handle.
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            api.close()

    def _client(self) -> NomadAPI:
        with self._lock:
            if self._api is None:
                try:
                    self._api = NomadAPI(self.settings, self.name)
                except (OSError, ValueError) as exc:  # unreadable TLS files
                    raise RunnerError(
                        f"cannot set up the connection to Nomad: {exc}; check "
                        f"plugins.runners.{self.name}.ca_cert/client_cert/client_key"
                    ) from exc
            return self._api

    # -- the contract ------------------------------------------------------------------------

    def launch(self, run: ProcessingRun) -> str:
        marker = run.run_folder / MARKER if run.run_folder is not None else None
        if marker is not None:
            known = _read_marker(marker)
            if known is not None:
                return known  # dispatched before (the processor restarted): follow that one
        module = run.module
        if not (module.docker_tag or "").strip():
            raise RunnerError(f"module '{run.module_name}' has no docker_tag for Nomad to run")
        if module.requires_root and not run.allow_root:
            raise RunnerError(
                f"module '{run.module_name}' requires root (requires_root) and "
                "support_root_modules is off"
            )
        try:
            spec = build_job(self.settings, run)
        except HclError as exc:
            raise RunnerError(f"module '{run.module_name}': {exc}") from None
        folders = {
            META_IN: self._client_path(run.input_folder, "input"),
            META_OUT: self._client_path(run.output_folder, "output"),
        }
        if module.requires_persistence:
            if run.persistence_folder is None:
                raise RunnerError(
                    f"module '{run.module_name}' requires persistence and no "
                    "persistence_folder is configured"
                )
            run.persistence_folder.mkdir(parents=True, exist_ok=True)
            folders[META_PERSISTENCE] = self._client_path(run.persistence_folder, "persistence")
        body = dispatch_body(run, folders)
        reply = self._dispatch(spec, body)
        dispatched = reply.get("DispatchedJobID")
        if not isinstance(dispatched, str) or not dispatched:
            raise RunnerError(f"Nomad's answer to dispatching {spec.job_id} has no job id: {reply}")
        handle = json.dumps(
            {
                "job": dispatched,
                "namespace": self.settings.namespace,
                "region": self.settings.region,
                "parent": spec.job_id,
            }
        )
        if marker is not None:
            atomic_write_bytes(marker, handle.encode("utf-8"))
        log.info(
            "module dispatched to Nomad",
            module=run.module_name,
            job=dispatched,
            again=not reply.get("EvalID"),
        )
        return handle

    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        info = _info(handle)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            outcome = self._look(info)
            if outcome is not None:
                return outcome
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.settings.poll_interval, remaining))

    def cancel(self, handle: str) -> None:
        info = _info(handle)
        self._client().stop(info["job"], scope=_scope(info))

    def cleanup(self, handle: str) -> None:
        if self.settings.keep_finished_jobs:
            return
        info = _info(handle)
        self._client().stop(info["job"], purge=True, scope=_scope(info))

    # -- launching ---------------------------------------------------------------------------

    def _dispatch(self, spec: JobSpec, body: dict[str, Any]) -> dict[str, Any]:
        api = self._client()
        self._register(spec)
        try:
            return api.dispatch(spec.job_id, body)
        except NomadError as exc:
            gone = "not found" in exc.body or "is stopped" in exc.body
            if exc.status not in (400, 404, 500) or not gone:
                raise
        # The registered job was stopped or purged meanwhile (by an operator, or by another
        # router with another version): register it again and dispatch once more.
        with self._lock:
            self._registered.discard(spec.job_id)
        self._register(spec)
        return api.dispatch(spec.job_id, body)

    def _register(self, spec: JobSpec) -> None:
        with self._lock:
            if spec.job_id in self._registered:
                return
        reply = self._client().register(spec.body)
        if reply.get("Warnings"):
            log.warning("Nomad warned about the module's job", job=spec.job_id, warnings=reply)
        with self._lock:
            self._registered.add(spec.job_id)

    def _client_path(self, path: Path, what: str) -> str:
        """``path`` as the Nomad clients see it, through ``shared_folders``."""
        real = os.path.realpath(path)
        mapping = self.settings.shared_folders
        if not mapping:
            return real
        for router, client in sorted(mapping.items(), key=lambda item: -len(item[0])):
            for base in {os.path.normpath(router), os.path.realpath(router)}:
                if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
                    rest = os.path.relpath(real, base)
                    return client if rest == "." else posixpath.join(client, *Path(rest).parts)
        raise RunnerError(
            f"the run's {what} folder {real} is not below any folder of "
            f"plugins.runners.{self.name}.shared_folders ({', '.join(sorted(mapping))}): the "
            "Nomad clients cannot see it; put the spool (processing_folder) and the "
            "persistence_folder on the shared file system and map them there"
        )

    # -- following ---------------------------------------------------------------------------

    def _look(self, info: dict[str, str]) -> RunOutcome | None:
        api = self._client()
        scope = _scope(info)
        job_id = info["job"]
        job = api.job(job_id, scope)
        if job is None:
            return RunOutcome(
                exit_code=None,
                error=f"Nomad has no job {job_id} any more (purged, or removed by its garbage "
                "collector): how the run ended is unknown",
            )
        alloc = choose(api.allocations(job_id, scope))
        if alloc is not None:
            ended = verdict(alloc, job)
            if ended is None:
                return None
            if ended.stop_job and not job.get("Stop"):
                api.stop(job_id, scope=scope)  # Nomad would place a replacement by itself
            return RunOutcome(
                exit_code=ended.exit_code,
                log=self._logs(ended.alloc_id, scope),
                error=ended.error,
            )
        submitted = float(job.get("SubmitTime") or 0) / 1e9
        waited = time.time() - submitted if submitted else 0.0
        if waited >= self.settings.placement_timeout:
            problem = placement_problem(api.evaluations(job_id, scope))
            if not job.get("Stop"):
                api.stop(job_id, scope=scope)  # so that it is not placed after all, later
            return RunOutcome(
                exit_code=None,
                error=f"Nomad did not place job {job_id} within "
                f"{self.settings.placement_timeout:g} s: {problem}",
            )
        if job.get("Stop"):
            return RunOutcome(
                exit_code=None, error="cancelled (Nomad stopped the job before placing it)"
            )
        if job.get("Status") == "dead":
            problem = placement_problem(api.evaluations(job_id, scope))
            return RunOutcome(
                exit_code=None, error=f"Nomad ended job {job_id} without running it: {problem}"
            )
        return None

    def _logs(self, alloc_id: str, scope: Scope) -> str:
        """The task's stdout, then its stderr (Nomad keeps them apart), each's last bytes."""
        limit = self.settings.max_log_bytes
        texts: dict[str, str] = {}
        notes: list[str] = []
        for kind in ("stdout", "stderr"):
            try:
                data = self._client().logs(alloc_id, TASK, kind, limit, scope)
            except NomadError as exc:
                if exc.status != 404:
                    notes.append(f"[the task's {kind} could not be fetched from Nomad: {exc}]")
                continue
            text = data.decode("utf-8", errors="replace")
            if len(data) >= limit:
                text = f"[... earlier {kind} not fetched ...]\n" + text.split("\n", 1)[-1]
            texts[kind] = text
        out, err = texts.get("stdout", ""), texts.get("stderr", "")
        parts = [out] if out else []
        if err:
            if out and not out.endswith("\n"):
                parts.append("\n")
            parts.append(("[stderr]\n" if out else "") + err)
        if notes:
            parts.append(("\n" if parts else "") + "\n".join(notes))
        return "".join(parts)


def _info(handle: str) -> dict[str, str]:
    try:
        info = json.loads(handle)
        if isinstance(info, dict) and isinstance(info.get("job"), str) and info["job"]:
            return {k: str(v) for k, v in info.items() if v is not None}
    except ValueError:
        pass
    raise RunnerError(f"not a handle of the nomad runner: {handle!r}")


def _scope(info: dict[str, str]) -> Scope:
    return (info.get("namespace") or "default", info.get("region") or "")


def _read_marker(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
        _info(text)
    except (OSError, RunnerError):
        return None
    return text


__all__ = ["MARKER", "NomadRunner"]
