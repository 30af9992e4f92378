"""The state behind the Nomad stand-in (see ``nomad_standin``): jobs, evaluations, allocations.

It stands in for what the runner cannot see but depends on: Nomad's scheduler, which places a
job's task group on a node of its datacenters that passes its constraints and has the CPU and
memory it asks for (else the evaluation completes with ``FailedTGAllocs`` and a blocked
evaluation waits, as in Nomad), and a client's docker (or podman) task driver. There is no
container engine here: a task's ``image`` names a command line in ``images``, which runs as a
subprocess. The stand-in "mounts" a bind mount by replacing the mount's target path with its
source path in the task's environment (mercure modules find their folders through
``MERCURE_IN_DIR`` and ``MERCURE_OUT_DIR``); a source that does not exist fails the task as
Docker refuses it. Every record uses the field names and values of Nomad's API (Job,
Evaluation, AllocListStub, TaskState, TaskEvent, AllocMetric).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECOND_NS = 1_000_000_000
#: Keys of the docker driver's ``config`` the stand-in knows (others fail validation, as on
#: a Nomad client).
DOCKER_CONFIG = frozenset(
    {
        "image",
        "command",
        "args",
        "mount",
        "volumes",
        "network_mode",
        "force_pull",
        "auth",
        "labels",
        "work_dir",
        "cap_drop",
        "cap_add",
        "security_opt",
    }
)
PODMAN_CONFIG = frozenset({"image", "command", "args", "volumes", "network_mode", "force_pull"})


def now_ns() -> int:
    return time.time_ns()


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Node:
    """A Nomad client node."""

    name: str
    datacenter: str = "dc1"
    cpu: int = 4000
    memory: int = 8192
    attributes: dict[str, str] = field(
        default_factory=lambda: {"kernel.name": "linux", "driver.docker": "1", "cpu.arch": "amd64"}
    )
    meta: dict[str, str] = field(default_factory=dict)
    drivers: tuple[str, ...] = ("docker", "podman")
    node_class: str = ""
    id: str = field(default_factory=new_id)
    up: bool = True


@dataclass
class Running:
    """The stand-in's own bookkeeping of one allocation's task (not part of the API)."""

    proc: subprocess.Popen[bytes] | None = None
    folder: Path | None = None
    killing: bool = False
    lost: bool = False
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


def task_event(kind: str, message: str = "", **fields: Any) -> dict[str, Any]:
    """A TaskEvent with every field Nomad's API returns."""
    event: dict[str, Any] = {
        "Type": kind,
        "Time": now_ns(),
        "DisplayMessage": message,
        "Details": {},
        "FailsTask": False,
        "RestartReason": "",
        "SetupError": "",
        "DriverError": "",
        "ExitCode": 0,
        "Signal": 0,
        "Message": "",
        "KillReason": "",
        "KillTimeout": 0,
        "KillError": "",
        "StartDelay": 0,
        "DownloadError": "",
        "ValidationError": "",
        "DiskLimit": 0,
        "FailedSibling": "",
        "VaultError": "",
        "TaskSignalReason": "",
        "TaskSignal": "",
        "DriverMessage": "",
        "GenericSource": "",
    }
    event.update(fields)
    return event


def constraint_text(c: dict[str, Any]) -> str:
    """Nomad's ``Constraint.String()``: the key of ``ConstraintFiltered``."""
    return f"{c.get('LTarget', '')} {c.get('Operand', '')} {c.get('RTarget', '')}"


def _interpolate(text: str, values: dict[str, str]) -> str:
    # Nomad leaves an unknown ${...} as it is.
    return re.sub(r"\$\{([^}]+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


class Cluster:
    """Jobs, evaluations and allocations of one Nomad region, and the nodes that run them."""

    def __init__(self, nodes: list[Node], images: dict[str, list[str]]) -> None:
        self.nodes = nodes
        self.images = images
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.running: dict[str, Running] = {}
        self.index = 10
        self.lock = threading.RLock()
        self.replace_lost = True
        self.started: list[Running] = []
        self._root = Path(tempfile.mkdtemp(prefix="nomad-standin-"))
        self._closed = False

    # -- state -------------------------------------------------------------------------------

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def children(self, parent: str, namespace: str = "default") -> list[dict[str, Any]]:
        with self.lock:
            return [
                j for (ns, _), j in self.jobs.items() if ns == namespace and j["ParentID"] == parent
            ]

    def job_allocs(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                a
                for a in self.allocs.values()
                if a["Namespace"] == namespace and a["JobID"] == job_id
            ]

    def job_evals(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for e in self.evals.values()
                if e["Namespace"] == namespace and e["JobID"] == job_id
            ]

    def new_eval(
        self, job: dict[str, Any], trigger: str, status: str = "pending"
    ) -> dict[str, Any]:
        index = self.next_index()
        now = now_ns()
        ev = {
            "ID": new_id(),
            "Namespace": job["Namespace"],
            "Priority": job.get("Priority", 50),
            "Type": job["Type"],
            "TriggeredBy": trigger,
            "JobID": job["ID"],
            "JobModifyIndex": job["JobModifyIndex"],
            "NodeID": "",
            "NodeModifyIndex": 0,
            "DeploymentID": "",
            "Status": status,
            "StatusDescription": "",
            "Wait": 0,
            "WaitUntil": None,
            "NextEval": "",
            "PreviousEval": "",
            "BlockedEval": "",
            "RelatedEvals": None,
            "FailedTGAllocs": None,
            "ClassEligibility": None,
            "QuotaLimitReached": "",
            "EscapedComputedClass": False,
            "AnnotatePlan": False,
            "QueuedAllocations": None,
            "LeaderACL": "",
            "SnapshotIndex": 0,
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": now,
            "ModifyTime": now,
        }
        self.evals[ev["ID"]] = ev
        return ev

    # -- the scheduler -----------------------------------------------------------------------

    def schedule(self, eval_id: str) -> None:
        """Process one evaluation: place the job's group, or record why it cannot be."""
        with self.lock:
            ev = self.evals.get(eval_id)
            if ev is None or ev["Status"] not in ("pending", "blocked"):
                return
            job = self.jobs.get((ev["Namespace"], ev["JobID"]))
            if job is None or job["Stop"]:
                ev["Status"] = "canceled" if ev["Status"] == "blocked" else "complete"
                ev["ModifyIndex"] = self.next_index()
                return
            if any(not self._terminal(a) for a in self.job_allocs(job["Namespace"], job["ID"])):
                ev["Status"] = "complete"
                return
            group = job["TaskGroups"][0]
            node, metric = self._select(job, group)
            was_blocked = ev["Status"] == "blocked"
            ev["Status"] = "complete"
            ev["ModifyIndex"] = self.next_index()
            ev["ModifyTime"] = now_ns()
            if node is None:
                if was_blocked:
                    ev["Status"] = "blocked"  # still waiting for resources
                    return
                ev["FailedTGAllocs"] = {group["Name"]: metric}
                ev["QueuedAllocations"] = {group["Name"]: 1}
                blocked = self.new_eval(job, ev["TriggeredBy"], status="blocked")
                blocked["PreviousEval"] = ev["ID"]
                blocked["StatusDescription"] = "created to place remaining allocations"
                ev["BlockedEval"] = blocked["ID"]
                job["Status"] = "pending"
                return
            ev["QueuedAllocations"] = {group["Name"]: 0}
            self._place(job, group, node, ev["ID"])

    def _select(
        self, job: dict[str, Any], group: dict[str, Any]
    ) -> tuple[Node | None, dict[str, Any]]:
        metric: dict[str, Any] = {
            "NodesEvaluated": 0,
            "NodesFiltered": 0,
            "NodesInPool": len(self.nodes),
            "NodesAvailable": {},
            "ClassFiltered": None,
            "ConstraintFiltered": None,
            "NodesExhausted": 0,
            "ClassExhausted": None,
            "DimensionExhausted": None,
            "QuotaExhausted": None,
            "ResourcesExhausted": None,
            "Scores": None,
            "ScoreMetaData": None,
            "AllocationTime": 20000,
            "CoalescedFailures": 0,
        }
        patterns = job.get("Datacenters") or ["*"]
        in_dcs = [
            n
            for n in self.nodes
            if n.up and any(fnmatch.fnmatch(n.datacenter, p) for p in patterns)
        ]
        for pattern in patterns:
            metric["NodesAvailable"][pattern] = sum(
                1 for n in in_dcs if fnmatch.fnmatch(n.datacenter, pattern)
            )
        task = group["Tasks"][0]
        constraints = (
            (job.get("Constraints") or [])
            + (group.get("Constraints") or [])
            + (task.get("Constraints") or [])
        )
        filtered: dict[str, int] = {}
        exhausted: dict[str, int] = {}
        for node in in_dcs:
            metric["NodesEvaluated"] += 1
            if task["Driver"] not in node.drivers:
                metric["NodesFiltered"] += 1
                filtered["missing drivers"] = filtered.get("missing drivers", 0) + 1
                continue
            failing = next((c for c in constraints if not self._satisfied(c, node)), None)
            if failing is not None:
                metric["NodesFiltered"] += 1
                key = constraint_text(failing)
                filtered[key] = filtered.get(key, 0) + 1
                continue
            short = self._short_of(node, task.get("Resources") or {})
            if short:
                metric["NodesExhausted"] += 1
                exhausted[short] = exhausted.get(short, 0) + 1
                continue
            return node, metric
        metric["ConstraintFiltered"] = filtered or None
        metric["DimensionExhausted"] = exhausted or None
        return None, metric

    @staticmethod
    def _satisfied(c: dict[str, Any], node: Node) -> bool:
        values = {f"attr.{k}": v for k, v in node.attributes.items()}
        values.update({f"meta.{k}": v for k, v in node.meta.items()})
        values.update(
            {
                "node.datacenter": node.datacenter,
                "node.class": node.node_class,
                "node.unique.name": node.name,
                "node.unique.id": node.id,
            }
        )
        left_raw = str(c.get("LTarget", ""))
        match = re.fullmatch(r"\$\{([^}]+)\}", left_raw)
        present = match is None or match.group(1) in values
        left = values.get(match.group(1), "") if match else left_raw
        right = str(c.get("RTarget", ""))
        op = c.get("Operand") or "="
        if op in ("is_set", "is_not_set"):
            return present == (op == "is_set")
        if op == "distinct_hosts":
            return True  # one allocation per job here
        if not present:
            return False
        if op in ("=", "==", "is"):
            return left == right
        if op in ("!=", "not"):
            return left != right
        if op == "regexp":
            return re.search(right, left) is not None
        if op == "set_contains":
            have = {p.strip() for p in left.split(",")}
            return all(p.strip() in have for p in right.split(","))
        if op in ("version", "semver"):
            ok = True
            for part in right.split(","):
                m = re.fullmatch(r"\s*(>=|<=|>|<|=|!=)?\s*(\S+)\s*", part)
                if not m:
                    return False
                cmp, want = m.group(1) or "=", _version(m.group(2))
                have_v = _version(left)
                ok = (
                    ok
                    and {
                        ">=": have_v >= want,
                        "<=": have_v <= want,
                        ">": have_v > want,
                        "<": have_v < want,
                        "=": have_v == want,
                        "!=": have_v != want,
                    }[cmp]
                )
            return ok
        if op in ("<", "<=", ">", ">="):
            try:
                a: Any = float(left)
                b: Any = float(right)
            except ValueError:
                a, b = left, right
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        return False

    def _short_of(self, node: Node, wanted: dict[str, Any]) -> str:
        """The exhausted dimension (``memory``, ``cpu``) if ``node`` cannot run ``wanted``."""
        used_cpu = used_mem = 0
        for alloc in self.allocs.values():
            if alloc["NodeID"] == node.id and not self._terminal(alloc):
                res = alloc["_resources"]
                used_cpu += res.get("CPU") or 0
                used_mem += res.get("MemoryMB") or 0
        cpu = wanted.get("CPU") or (wanted.get("Cores") or 0) * 1000 or 100
        memory = wanted.get("MemoryMB") or 300
        if used_mem + memory > node.memory:
            return "memory"
        if used_cpu + cpu > node.cpu:
            return "cpu"
        return ""

    @staticmethod
    def _terminal(alloc: dict[str, Any]) -> bool:
        return alloc["ClientStatus"] in ("complete", "failed", "lost")

    def _place(
        self,
        job: dict[str, Any],
        group: dict[str, Any],
        node: Node,
        eval_id: str,
        previous: str = "",
    ) -> dict[str, Any]:
        task = group["Tasks"][0]
        index = self.next_index()
        now = now_ns()
        alloc: dict[str, Any] = {
            "ID": new_id(),
            "EvalID": eval_id,
            "Name": f"{job['ID']}.{group['Name']}[0]",
            "Namespace": job["Namespace"],
            "NodeID": node.id,
            "NodeName": node.name,
            "JobID": job["ID"],
            "JobType": job["Type"],
            "JobVersion": job["Version"],
            "TaskGroup": group["Name"],
            "AllocatedResources": None,
            "DesiredStatus": "run",
            "DesiredDescription": "",
            "ClientStatus": "pending",
            "ClientDescription": "",
            "DesiredTransition": {"Migrate": None, "Reschedule": None, "ForceReschedule": None},
            "TaskStates": {
                task["Name"]: {
                    "State": "pending",
                    "Failed": False,
                    "Restarts": 0,
                    "LastRestart": None,
                    "StartedAt": None,
                    "FinishedAt": None,
                    "Events": [],
                    "TaskHandle": None,
                }
            },
            "DeploymentStatus": None,
            "FollowupEvalID": "",
            "NextAllocation": "",
            "PreviousAllocation": previous,
            "RescheduleTracker": None,
            "PreemptedAllocations": None,
            "PreemptedByAllocation": "",
            "CreateIndex": index,
            "ModifyIndex": index,
            "CreateTime": now,
            "ModifyTime": now,
            "_resources": dict(task.get("Resources") or {}),
        }
        self.allocs[alloc["ID"]] = alloc
        self.running[alloc["ID"]] = Running()
        job["Status"] = "running"
        threading.Thread(
            target=self._run_task, args=(alloc["ID"], job, task, node), daemon=True
        ).start()
        return alloc

    def retry_blocked(self) -> None:
        with self.lock:
            blocked = [e["ID"] for e in self.evals.values() if e["Status"] == "blocked"]
        for eval_id in blocked:
            self.schedule(eval_id)

    # -- the task driver ---------------------------------------------------------------------

    def _event(self, alloc_id: str, task: str, event: dict[str, Any], **state: Any) -> None:
        with self.lock:
            alloc = self.allocs.get(alloc_id)
            if alloc is None or self.running[alloc_id].lost:
                return  # purged, or its node is gone: nothing reaches the servers any more
            ts = alloc["TaskStates"][task]
            ts["Events"].append(event)
            ts.update(state)
            alloc["ModifyIndex"] = self.next_index()
            alloc["ModifyTime"] = now_ns()

    def _set_alloc(self, alloc_id: str, **fields: Any) -> None:
        with self.lock:
            alloc = self.allocs.get(alloc_id)
            if alloc is None or self.running[alloc_id].lost:
                return
            alloc.update(fields)
            alloc["ModifyIndex"] = self.next_index()
            if self._terminal(alloc):
                self._job_maybe_dead(alloc["Namespace"], alloc["JobID"])

    def _job_maybe_dead(self, namespace: str, job_id: str) -> None:
        job = self.jobs.get((namespace, job_id))
        if job is not None and all(self._terminal(a) for a in self.job_allocs(namespace, job_id)):
            job["Status"] = "dead"
            job["ModifyIndex"] = self.next_index()

    def _fail_task(self, alloc_id: str, name: str, event: dict[str, Any]) -> None:
        event["FailsTask"] = True
        self._event(alloc_id, name, event)
        self._event(
            alloc_id,
            name,
            task_event("Not Restarting", "Error was unrecoverable", FailsTask=True),
            State="dead",
            Failed=True,
            FinishedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        self._set_alloc(alloc_id, ClientStatus="failed", ClientDescription="Failed tasks")

    def _run_task(
        self, alloc_id: str, job: dict[str, Any], task: dict[str, Any], node: Node
    ) -> None:
        name = task["Name"]
        time.sleep(0.05)  # the client picks the allocation up a moment later
        self._event(alloc_id, name, task_event("Received", "Task received by client"))
        with self.lock:
            if self.allocs.get(alloc_id, {}).get("DesiredStatus") == "stop":
                self._set_alloc(alloc_id, ClientStatus="complete")
                return
        folder = self._root / alloc_id / name
        (folder / "local").mkdir(parents=True)
        logs = self._root / alloc_id / "alloc" / "logs"
        logs.mkdir(parents=True)
        self.running[alloc_id].folder = self._root / alloc_id
        self._event(alloc_id, name, task_event("Task Setup", "Building Task Directory"))
        config = task.get("Config") or {}
        allowed = DOCKER_CONFIG if task["Driver"] == "docker" else PODMAN_CONFIG
        unknown = sorted(set(config) - allowed)
        if unknown:
            why = (
                "failed to parse config: Invalid label: No argument or block type is named "
                f'"{unknown[0]}".'
            )
            self._fail_task(
                alloc_id, name, task_event("Failed Validation", why, ValidationError=why)
            )
            return
        values = {f"NOMAD_META_{k}": v for k, v in (job.get("Meta") or {}).items()}
        values.update(
            {
                "NOMAD_ALLOC_ID": alloc_id,
                "NOMAD_JOB_ID": job["ID"],
                "NOMAD_JOB_PARENT_ID": job.get("ParentID", ""),
                "NOMAD_TASK_NAME": name,
                "NOMAD_NAMESPACE": job["Namespace"],
                "NOMAD_DC": node.datacenter,
            }
        )
        image = str(config.get("image", ""))
        if image not in self.images:
            repo = image.split(":")[0]
            why = (
                f"Failed to pull `{image}`: Error response from daemon: pull access denied for "
                f"{repo}, repository does not exist or may require 'docker login': denied: "
                "requested access to the resource is denied"
            )
            self._event(alloc_id, name, task_event("Driver", "Downloading image"))
            self._fail_task(alloc_id, name, task_event("Driver Failure", why, DriverError=why))
            return
        mounts: list[tuple[str, str]] = []
        for mount in config.get("mount") or []:
            mounts.append((_interpolate(mount["source"], values), mount["target"]))
        for volume in config.get("volumes") or []:
            source, target = _interpolate(volume, values).split(":")[:2]
            mounts.append((source, target))
        for source, _target in mounts:
            if not os.path.isabs(source) or not os.path.isdir(source):
                why = (
                    "failed to create container: API error (400): invalid mount config for type "
                    f'"bind": bind source path does not exist: {source}'
                )
                self._fail_task(alloc_id, name, task_event("Driver Failure", why, DriverError=why))
                return
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **values}
        for key, value in (task.get("Env") or {}).items():
            value = _interpolate(str(value), values)
            for source, target in mounts:
                if value == target or value.startswith(target + "/"):
                    value = source + value[len(target) :]
            env[key] = value
        argv = list(self.images[image]) + [str(a) for a in config.get("args") or []]
        out = open(logs / f"{name}.stdout.0", "wb")  # noqa: SIM115 - closed below
        err = open(logs / f"{name}.stderr.0", "wb")  # noqa: SIM115
        try:
            with self.lock:
                run = self.running[alloc_id]
                if self.allocs.get(alloc_id, {}).get("DesiredStatus") == "stop" or run.lost:
                    self._set_alloc(alloc_id, ClientStatus="complete")
                    return
                run.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
                run.env, run.argv = env, argv
                self.started.append(run)
            self._event(
                alloc_id,
                name,
                task_event("Started", "Task started by client"),
                State="running",
                StartedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            self._set_alloc(alloc_id, ClientStatus="running")
            rc = run.proc.wait()
        finally:
            out.close()
            err.close()
        code = rc if rc >= 0 else 128 - rc
        killed = run.killing
        self._event(
            alloc_id,
            name,
            task_event(
                "Terminated",
                f"Exit Code: {code}",
                ExitCode=code,
                Details={"exit_code": str(code), "signal": "0", "oom_killed": "false"},
            ),
        )
        finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if killed:
            self._event(
                alloc_id,
                name,
                task_event("Killed", "Task successfully killed"),
                State="dead",
                FinishedAt=finished,
            )
            self._set_alloc(
                alloc_id, ClientStatus="complete", ClientDescription="All tasks have completed"
            )
        elif code == 0:
            with self.lock:
                ts = self.allocs.get(alloc_id, {}).get("TaskStates", {}).get(name)
                if ts is not None:
                    ts.update(State="dead", FinishedAt=finished)
            self._set_alloc(
                alloc_id, ClientStatus="complete", ClientDescription="All tasks have completed"
            )
        else:
            self._event(
                alloc_id,
                name,
                task_event(
                    "Not Restarting",
                    'Exceeded allowed attempts 0 in interval 24h0m0s and mode is "fail"',
                    FailsTask=True,
                ),
                State="dead",
                Failed=True,
                FinishedAt=finished,
            )
            self._set_alloc(alloc_id, ClientStatus="failed", ClientDescription="Failed tasks")
        self.retry_blocked()

    # -- stopping ----------------------------------------------------------------------------

    def stop_alloc(self, alloc_id: str, description: str) -> None:
        """The client's side of a stopped job: SIGTERM, SIGKILL after the kill timeout."""
        with self.lock:
            alloc = self.allocs.get(alloc_id)
            if alloc is None or self._terminal(alloc):
                return
            alloc["DesiredStatus"] = "stop"
            alloc["DesiredDescription"] = description
            alloc["ModifyIndex"] = self.next_index()
            run = self.running[alloc_id]
            proc = run.proc
            job = self.jobs.get((alloc["Namespace"], alloc["JobID"]))
            task = job["TaskGroups"][0]["Tasks"][0] if job else {}
        if proc is None:
            if alloc["ClientStatus"] == "pending" and run.folder is None:
                self._set_alloc(alloc_id, ClientStatus="complete")
            return
        if run.killing:
            return
        run.killing = True
        kill_timeout = (task.get("KillTimeout") or 5 * SECOND_NS) / SECOND_NS
        self._event(
            alloc_id,
            task.get("Name", "module"),
            task_event(
                "Killing",
                f"Sent interrupt. Waiting {kill_timeout:g}s before force killing",
                KillTimeout=int(kill_timeout * SECOND_NS),
            ),
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        timer = threading.Timer(kill_timeout, self._force_kill, args=(proc,))
        timer.daemon = True
        timer.start()

    @staticmethod
    def _force_kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def lose_node(self, node: Node) -> list[str]:
        """The node stops heartbeating: its allocations are lost (and replaced elsewhere)."""
        lost: list[str] = []
        with self.lock:
            node.up = False
            for alloc in list(self.allocs.values()):
                if alloc["NodeID"] != node.id or self._terminal(alloc):
                    continue
                why = "alloc is lost since its node is down"
                alloc.update(
                    ClientStatus="lost",
                    ClientDescription=why,
                    DesiredStatus="stop",
                    DesiredDescription=why,
                    ModifyIndex=self.next_index(),
                )
                run = self.running[alloc["ID"]]
                run.lost = True
                if run.proc is not None and run.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(run.proc.pid, signal.SIGKILL)  # the node is gone with it
                lost.append(alloc["ID"])
                job = self.jobs.get((alloc["Namespace"], alloc["JobID"]))
                if job is None or job["Stop"] or not self.replace_lost:
                    continue
                ev = self.new_eval(job, "node-update")
                group = job["TaskGroups"][0]
                target, _metric = self._select(job, group)
                ev["Status"] = "complete"
                if target is not None:
                    replacement = self._place(job, group, target, ev["ID"], previous=alloc["ID"])
                    alloc["NextAllocation"] = replacement["ID"]
        return lost

    def kill_all(self) -> None:
        self._closed = True
        with self.lock:
            procs = [r.proc for r in self.running.values() if r.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


__all__ = [
    "SECOND_NS",
    "Cluster",
    "Node",
    "Running",
    "constraint_text",
    "new_id",
    "now_ns",
    "task_event",
]
