"""The ``docker`` runner: each module run is a container of the module's ``docker_tag``.

The container is created with the name ``mercure-<run_id>`` and labels that say which run it
is, where its output goes and whose files that output must be afterwards, so everything a
processor needs to follow a run lives in the engine: ``launch`` called again for the same
run finds the container by its name (and starts it if a processor died between creating
and starting it), and ``wait`` on a new runner instance, after a processor restart, follows
the container by its id, collects its exit code and log, and gives its output back to the
router's user. The container is removed by ``cleanup`` once the processor has recorded the
outcome; containers of finished jobs that a processor did not get to remove (it was killed
in between) are removed when a runner instance starts.

Defaults keep a module in its box: the router's uid and gid (nobody when the router is
root; root only for a ``requires_root`` module with ``support_root_modules``), every
capability dropped, ``no-new-privileges``, no network unless the module has
``network_enabled``, the configured memory, CPU and process limits, and only the docker
arguments and volume folders the operator allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount
from mercure.fsutil import atomic_write_bytes
from mercure.logs import get_logger
from mercure.runners import (
    CONTAINER_IN_DIR,
    CONTAINER_OUT_DIR,
    CONTAINER_PERSISTENCE_DIR,
    ProcessingRun,
    Runner,
    RunnerError,
    RunnerUnavailable,
    RunOutcome,
    folder_environment,
)

from mercure_runner_docker import arguments as module_args
from mercure_runner_docker.collect import chown_in_container, read_log
from mercure_runner_docker.engine import MONAI_MANIFEST, Images, endpoint, make_client
from mercure_runner_docker.ownership import (
    container_identity,
    foreign_paths,
    open_folders,
    router_identity,
    take_back,
)
from mercure_runner_docker.settings import DockerRunnerSettings

if TYPE_CHECKING:
    import docker
    from mercure.config import Module
    from mercure.lifecycle import PluginContext

log = get_logger("mercure.runner.docker")

NAME_PREFIX = "mercure-"
POLL = 0.2
CANCEL_FILE = "docker-cancel.json"
LABEL = "org.mercure"
L_RUNNER = f"{LABEL}.runner"
L_APPLIANCE = f"{LABEL}.appliance"
L_RUN_ID = f"{LABEL}.run_id"
L_TASK = f"{LABEL}.task_id"
L_MODULE = f"{LABEL}.module"
L_IMAGE = f"{LABEL}.image"
L_OUTPUT = f"{LABEL}.output"
L_RUN_FOLDER = f"{LABEL}.run_folder"
L_OWNER = f"{LABEL}.owner"
L_HELPER = f"{LABEL}.helper"


def container_name(run_id: str) -> str:
    return NAME_PREFIX + run_id


class DockerRunner(Runner[DockerRunnerSettings]):
    """Runs modules as docker containers; see the module docstring."""

    def __init__(self, name: str, settings: DockerRunnerSettings, context: PluginContext) -> None:
        super().__init__(name, settings, context)
        self._client: docker.DockerClient | None = None
        self._images: Images | None = None
        self._lock = threading.Lock()
        self._cancels: dict[str, dict[str, Any]] = {}
        self.where = endpoint(settings)

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def check_module(
        cls, settings: DockerRunnerSettings | None, name: str, module: Module
    ) -> list[tuple[str, str]]:
        return module_args.module_problems(module, settings or DockerRunnerSettings())

    def start(self) -> None:
        try:
            self.sweep()
        except RunnerError as exc:
            log.warning("could not look for containers left behind", error=str(exc))

    def close(self) -> None:
        # Running containers keep running: the next processor re-attaches to them.
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            self._client = None
            self._images = None

    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                self._client = make_client(self.settings)
            return self._client

    @property
    def images(self) -> Images:
        client = self.client
        with self._lock:
            if self._images is None:
                try:
                    state: Path | None = self.context.state_dir() / "pulls.json"
                except (RuntimeError, OSError):
                    state = None
                self._images = Images(client, state, self.where)
            return self._images

    # -- the contract ---------------------------------------------------------------------

    def launch(self, run: ProcessingRun) -> str:
        module, who = run.module, f"module '{run.module_name}'"
        image = module.docker_tag or ""
        if not image:
            raise RunnerError(f"{who} has no docker_tag: the docker runner runs container images")
        if not run.run_id:
            raise RunnerError(f"{who}: the run has no run_id to name its container after")
        extra, problems = module_args.docker_arguments(module, self.settings)
        volumes, more = module_args.additional_volumes(module, self.settings, resolve=True)
        policy, most = module_args.pull_policy(module, self.settings)
        problems += more + most
        if problems:
            raise RunnerError(f"{who}: " + "; ".join(f"{f}: {m}" for f, m in problems))
        as_root = bool(module.requires_root)
        if as_root and not run.allow_root:
            raise RunnerError(
                f"{who} requires root (requires_root), but support_root_modules is false: set "
                "it to true in the configuration to let this module run as root"
            )
        name = container_name(run.run_id)
        existing = self._existing(name, run.run_id)
        if existing is not None:
            return self._resume(existing, who)

        self.images.ensure(image, policy)
        start_with = self._monai_command(image, who, run.allow_root)
        as_root = as_root or bool(start_with)
        identity = container_identity(self.settings, as_root)
        open_folders(identity, run.input_folder, run.output_folder)
        env = dict(self.settings.environment)
        env.update(run.environment)
        env.update(folder_environment(CONTAINER_IN_DIR, CONTAINER_OUT_DIR))
        mounts = [
            Mount(CONTAINER_IN_DIR, self._host(run.input_folder), type="bind"),
            Mount(CONTAINER_OUT_DIR, self._host(run.output_folder), type="bind"),
        ]
        if run.persistence_folder is not None:
            self._persistence(run.persistence_folder, identity.uid, identity.gid)
            mounts.append(
                Mount(CONTAINER_PERSISTENCE_DIR, self._host(run.persistence_folder), type="bind")
            )
            env["MODULE_PERSISTENCE_DIR"] = CONTAINER_PERSISTENCE_DIR
        uid, gid = router_identity()
        labels = {
            L_RUNNER: self.name,
            L_APPLIANCE: self.context.appliance_name,
            L_RUN_ID: run.run_id,
            L_TASK: run.task_id,
            L_MODULE: run.module_name,
            L_IMAGE: image,
            L_OUTPUT: str(run.output_folder),
            L_RUN_FOLDER: str(run.run_folder or ""),
            L_OWNER: f"{uid}:{gid}",
        }
        kwargs: dict[str, Any] = {
            "image": image,
            "name": name,
            "detach": True,
            "environment": env,
            "mounts": mounts,
            "labels": labels,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "init": self.settings.init,
        }
        if volumes:
            kwargs["volumes"] = {self._host(Path(h)): spec for h, spec in volumes.items()}
        if not module.network_enabled:
            kwargs["network_mode"] = "none"
        elif self.settings.network_mode:
            kwargs["network_mode"] = self.settings.network_mode
        if identity.docker_user is not None:
            kwargs["user"] = identity.docker_user
        if self.settings.mem_limit:
            kwargs["mem_limit"] = self.settings.mem_limit
        if self.settings.cpus:
            kwargs["nano_cpus"] = int(self.settings.cpus * 1e9)
        if self.settings.pids_limit:
            kwargs["pids_limit"] = self.settings.pids_limit
        kwargs.update(start_with)
        kwargs.update(extra)  # the module's allowed arguments win over the runner's limits

        try:
            container = self.client.containers.create(**kwargs)
        except ImageNotFound:
            raise RunnerError(
                f"{who}: image {image!r} is not on the docker engine at {self.where}"
            ) from None
        except APIError as exc:
            if exc.status_code == 409:  # created meanwhile by another processor
                found = self._existing(name, run.run_id)
                if found is not None:
                    return self._resume(found, who)
            raise RunnerError(
                f"{who}: the docker engine refused the container: {_explain(exc)}"
            ) from None
        except (TypeError, ValueError) as exc:
            raise RunnerError(f"{who}: docker_arguments: {exc}") from None
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"{who}: cannot reach the docker engine at {self.where}: {exc}"
            ) from None
        container_id = str(container.id)
        self._start(container_id, who)
        log.info("container started", module=run.module_name, container=name, image=image)
        return _handle(container_id, name)

    def wait(self, handle: str, timeout: float) -> RunOutcome | None:
        ref = _parse(handle)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            attrs = self._inspect(ref["container"])
            if attrs is None:
                return RunOutcome(
                    exit_code=None,
                    error=f"container {ref['name']} is gone from the docker engine at "
                    f"{self.where} (removed by someone else?); its exit status is unknown",
                )
            status = attrs["State"].get("Status")
            if status in ("exited", "dead"):
                return self._outcome(attrs)
            if status == "created" and self._cancel_state(attrs) is not None:
                return RunOutcome(exit_code=None, error="cancelled before it started")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(POLL, remaining))

    def cancel(self, handle: str) -> None:
        ref = _parse(handle)
        attrs = self._inspect(ref["container"])
        if attrs is None:
            return
        asked = self._cancel_state(attrs)
        now = time.time()
        if asked is None:
            self._save_cancel(attrs, {"at": now, "signal": "SIGTERM"})
            self._kill(ref["container"], "SIGTERM")
        elif asked.get("signal") != "SIGKILL" and now - float(asked.get("at", 0)) >= (
            self.settings.kill_grace
        ):
            self._save_cancel(attrs, {"at": asked.get("at", now), "signal": "SIGKILL"})
            self._kill(ref["container"], "SIGKILL")

    def cleanup(self, handle: str) -> None:
        ref = _parse(handle)
        for target in (ref["container"], ref["name"] + "-chown"):
            self._remove(target)

    # -- containers -----------------------------------------------------------------------

    def _monai_command(self, image: str, who: str, allow_root: bool) -> dict[str, Any]:
        """How to start a MONAI Application Package (as mercure does: its manifest's command,
        as root); ``{}`` for any other image."""
        manifest = self.images.monai_manifest(image)
        if manifest is None:
            return {}
        command = manifest.get("command")
        if not command or not isinstance(command, (str, list)):
            raise RunnerError(
                f"{who}: image {image!r} is a MONAI Application Package whose "
                f"{MONAI_MANIFEST} names no command"
            )
        if not allow_root:
            raise RunnerError(
                f"{who}: image {image!r} is a MONAI Application Package, which runs as root, "
                "but support_root_modules is false: set it to true in the configuration"
            )
        return {"entrypoint": [""], "command": command}

    def _existing(self, name: str, run_id: str) -> dict[str, Any] | None:
        attrs = self._inspect(name)
        if attrs is None:
            return None
        labels = attrs["Config"].get("Labels") or {}
        if labels.get(L_RUN_ID) != run_id:
            raise RunnerError(
                f"a container named {name} exists on the docker engine at {self.where} that "
                "this router did not start for this run: remove it (docker rm) and retry the job"
            )
        return attrs

    def _resume(self, attrs: dict[str, Any], who: str) -> str:
        """The handle of a container launched before; start it if it never was."""
        if attrs["State"].get("Status") == "created" and self._cancel_state(attrs) is None:
            self._start(attrs["Id"], who)
        return _handle(attrs["Id"], attrs["Name"].lstrip("/"))

    def _start(self, container_id: str, who: str) -> None:
        try:
            self.client.api.start(container_id)
        except APIError as exc:
            self._remove(container_id)
            raise RunnerError(f"{who}: the container could not start: {_explain(exc)}") from None
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"{who}: cannot reach the docker engine at {self.where}: {exc}"
            ) from None

    def _inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.api.inspect_container(ref))
        except NotFound:
            return None
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"cannot reach the docker engine at {self.where}: {exc}"
            ) from None

    def _kill(self, container_id: str, signal: str) -> None:
        try:
            self.client.api.kill(container_id, signal=signal)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: not running any more
                raise RunnerError(
                    f"cannot stop container {container_id[:12]}: {_explain(exc)}"
                ) from None
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"cannot reach the docker engine at {self.where}: {exc}"
            ) from None

    def _remove(self, ref: str) -> None:
        try:
            self.client.api.remove_container(ref, force=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise RunnerError(f"cannot remove container {ref}: {_explain(exc)}") from None
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"cannot reach the docker engine at {self.where}: {exc}"
            ) from None

    def sweep(self) -> int:
        """Remove this runner's ended containers whose job has left the run's folder.

        A processor killed after recording an outcome and before ``cleanup`` leaves the
        container behind; the job has moved on (its run folder is gone), so nobody needs it.
        """
        try:
            found = self.client.api.containers(
                all=True,
                filters={
                    "label": [f"{L_RUNNER}={self.name}"],
                    "status": ["exited", "dead", "created"],
                },
            )
        except (DockerException, OSError) as exc:
            raise RunnerUnavailable(
                f"cannot reach the docker engine at {self.where}: {exc}"
            ) from None
        removed = 0
        for entry in found:
            labels = entry.get("Labels") or {}
            if labels.get(L_APPLIANCE) != self.context.appliance_name:
                continue
            folder = labels.get(L_RUN_FOLDER, "")
            if not folder or Path(folder).exists():
                continue
            with contextlib.suppress(RunnerError):
                self._remove(entry["Id"])
                removed += 1
                log.info("removed a container left behind", container=entry.get("Names"))
        return removed

    # -- the outcome ----------------------------------------------------------------------

    def _outcome(self, attrs: dict[str, Any]) -> RunOutcome:
        state = attrs["State"]
        labels = attrs["Config"].get("Labels") or {}
        code = state.get("ExitCode")
        text = read_log(self.client, attrs["Id"], self.settings.max_log_bytes)
        error: str | None = None
        asked = self._cancel_state(attrs)
        if asked is not None:
            error = f"cancelled (sent {asked.get('signal', 'SIGTERM')}; exit code {code})"
        elif state.get("OOMKilled"):
            limit = attrs.get("HostConfig", {}).get("Memory") or 0
            error = "killed by the kernel: out of memory" + (
                f" (memory limit {limit // (1024 * 1024)} MiB)" if limit else ""
            )
        elif state.get("Error"):
            error = f"the container failed: {state['Error']}"
        elif state.get("Status") == "dead":
            error = "the docker engine reports the container as dead"
        problem = self._give_back(attrs, labels)
        if problem:
            error = f"{error}; {problem}" if error else problem
        return RunOutcome(exit_code=None if error else int(code), log=text, error=error)

    def _give_back(self, attrs: dict[str, Any], labels: dict[str, str]) -> str | None:
        """Make the output the router's again; what went wrong, or None."""
        out = Path(labels.get(L_OUTPUT, ""))
        if not labels.get(L_OUTPUT) or not out.is_dir() or not foreign_paths(out):
            return None
        uid, gid = router_identity()
        try:
            if uid == 0:
                take_back(out)
            else:
                self._chown_in_container(attrs, labels, out, f"{uid}:{gid}")
        except (OSError, RunnerError, DockerException) as exc:
            return (
                f"the module's output files are not owned by the router's user (uid {uid}) and "
                f"could not be given back: {exc}"
            )
        return None

    def _chown_in_container(
        self, attrs: dict[str, Any], labels: dict[str, str], out: Path, owner: str
    ) -> None:
        """``chown -R`` the output as root in a helper container (the router is not root)."""
        image = self.settings.chown_image or labels.get(L_IMAGE) or attrs["Config"]["Image"]
        name = attrs["Name"].lstrip("/") + "-chown"
        self._remove(name)
        try:
            chown_in_container(
                self.client,
                image,
                name,
                self._host(out),
                owner,
                {**labels, L_HELPER: "chown"},
                self.settings.api_timeout,
            )
        finally:
            self._remove(name)
        with contextlib.suppress(OSError):
            out.chmod(0o755)

    # -- helpers --------------------------------------------------------------------------

    def _host(self, path: Path) -> str:
        """``path`` as the engine's host sees it (``host_paths``, longest prefix first)."""
        text = str(path)
        for prefix in sorted(self.settings.host_paths, key=len, reverse=True):
            base = prefix.rstrip("/")
            if text == base or text.startswith(base + "/"):
                return self.settings.host_paths[prefix].rstrip("/") + text[len(base) :]
        return text

    def _persistence(self, folder: Path, uid: int | None, gid: int | None) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            me, _ = router_identity()
            if me == 0 and uid is not None and folder.stat().st_uid == 0:
                os.chown(folder, uid, gid if gid is not None else -1)
        except OSError as exc:
            raise RunnerError(f"persistence folder {folder}: {exc}") from None

    def _cancel_file(self, attrs: dict[str, Any]) -> Path | None:
        folder = (attrs["Config"].get("Labels") or {}).get(L_RUN_FOLDER)
        return Path(folder) / CANCEL_FILE if folder else None

    def _cancel_state(self, attrs: dict[str, Any]) -> dict[str, Any] | None:
        path = self._cancel_file(attrs)
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return data if isinstance(data, dict) else None
            except (FileNotFoundError, ValueError):
                return None
        return self._cancels.get(attrs["Id"])

    def _save_cancel(self, attrs: dict[str, Any], state: dict[str, Any]) -> None:
        path = self._cancel_file(attrs)
        if path is not None and path.parent.is_dir():
            atomic_write_bytes(path, json.dumps(state).encode(), fsync=False)
        else:
            self._cancels[attrs["Id"]] = state


def _handle(container_id: str, name: str) -> str:
    return json.dumps({"container": container_id, "name": name})


def _parse(handle: str) -> dict[str, str]:
    try:
        data = json.loads(handle)
        return {"container": str(data["container"]), "name": str(data["name"])}
    except (ValueError, KeyError, TypeError):
        raise RunnerError(f"not a handle of the docker runner: {handle!r}") from None


def _explain(exc: APIError) -> str:
    return str(exc.explanation or exc)


__all__ = ["DockerRunner", "container_name"]
