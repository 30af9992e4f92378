"""An HTTP server that stands in for a Nomad agent in the nomad runner's tests.

Nomad cannot be installed here, so this server implements exactly the endpoints of Nomad's
HTTP API (https://developer.hashicorp.com/nomad/api-docs) that the runner calls, with
Nomad's JSON bodies, field names and status codes:

* ``PUT``/``POST /v1/jobs``: register a job (JobRegisterResponse); a parameterized job gets
  no evaluation. Validation errors are 500 with Nomad's multierror text, as Nomad answers.
* ``POST``/``PUT /v1/job/<id>/dispatch``: dispatch a parameterized job (JobDispatchResponse;
  ``<parent>/dispatch-<unix time>-<8 hex>`` ids; ``IdempotencyToken`` returns the existing
  child; Nomad's errors for missing or unpermitted meta, a stopped or unknown parent: 500).
* ``GET /v1/job/<id>`` (Job, or 404 ``job not found``), ``GET /v1/job/<id>/allocations``
  (AllocListStub list with TaskStates), ``GET /v1/job/<id>/evaluations`` (Evaluation list
  with FailedTGAllocs / BlockedEval).
* ``DELETE /v1/job/<id>`` (stop; ``?purge=true`` also removes it; an unknown job is 200 with
  an empty JobDeregisterResponse, as in Nomad).
* ``GET /v1/client/fs/logs/<alloc>`` with ``task``, ``type``, ``origin``, ``offset`` and
  ``plain=true`` (raw bytes) or without it (one StreamFrame with base64 ``Data``).

ACLs as Nomad enforces them when they are on (``tokens`` given): ``X-Nomad-Token`` is
required; an unknown secret is 403 ``ACL token not found``, an expired token, no token, or a
token without the needed capability is 403 ``Permission denied`` (plain-text bodies, as
Nomad writes errors). Jobs live in the namespace of ``?namespace=`` (default ``default``).
Paths are decoded before the job id is split off by its suffix, as Nomad does, so a
dispatched id's ``/`` may be sent escaped (``%2F``).

Two differences from Nomad, both stricter: a field a registered job (or a dispatch request)
has that Nomad's API does not define is a 400 naming it (Nomad would silently ignore a
misspelled field), and blocking queries (``?index=``) are not implemented (the runner polls).
What stands in for the scheduler and the task driver is described in ``standin_cluster``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from standin_cluster import SECOND_NS, Cluster, Node, new_id, now_ns

JOB_FIELDS = frozenset(
    [
        "Region",
        "Namespace",
        "ID",
        "ParentID",
        "Name",
        "Type",
        "Priority",
        "AllAtOnce",
        "Datacenters",
        "NodePool",
        "Constraints",
        "Affinities",
        "Spreads",
        "TaskGroups",
        "Update",
        "Multiregion",
        "Periodic",
        "ParameterizedJob",
        "Dispatched",
        "DispatchIdempotencyToken",
        "Payload",
        "Reschedule",
        "Migrate",
        "Meta",
        "ConsulToken",
        "ConsulNamespace",
        "VaultToken",
        "VaultNamespace",
        "NomadTokenID",
        "Status",
        "StatusDescription",
        "Stable",
        "Version",
        "SubmitTime",
        "CreateIndex",
        "ModifyIndex",
        "JobModifyIndex",
        "Stop",
        "UI",
        "VersionTag",
    ]
)
GROUP_FIELDS = frozenset(
    [
        "Name",
        "Count",
        "Constraints",
        "Affinities",
        "Tasks",
        "Spreads",
        "Volumes",
        "RestartPolicy",
        "Disconnect",
        "ReschedulePolicy",
        "EphemeralDisk",
        "Update",
        "Migrate",
        "Networks",
        "Meta",
        "Services",
        "ShutdownDelay",
        "StopAfterClientDisconnect",
        "MaxClientDisconnect",
        "Scaling",
        "Consul",
        "PreventRescheduleOnLost",
    ]
)
TASK_FIELDS = frozenset(
    [
        "Name",
        "Driver",
        "User",
        "Lifecycle",
        "Config",
        "Constraints",
        "Affinities",
        "Env",
        "Services",
        "Resources",
        "RestartPolicy",
        "Meta",
        "KillTimeout",
        "LogConfig",
        "Artifacts",
        "Vault",
        "Consul",
        "Templates",
        "DispatchPayload",
        "VolumeMounts",
        "CSIPluginConfig",
        "Leader",
        "ShutdownDelay",
        "KillSignal",
        "Kind",
        "ScalingPolicies",
        "Identity",
        "Identities",
        "Actions",
        "Schedule",
    ]
)
RESOURCE_FIELDS = frozenset(
    [
        "CPU",
        "Cores",
        "MemoryMB",
        "MemoryMaxMB",
        "DiskMB",
        "Networks",
        "Devices",
        "IOPS",
        "NUMA",
        "SecretsMB",
    ]
)
DEVICE_FIELDS = frozenset({"Name", "Count", "Constraints", "Affinities"})
CONSTRAINT_FIELDS = frozenset({"LTarget", "RTarget", "Operand"})
AFFINITY_FIELDS = frozenset({"LTarget", "RTarget", "Operand", "Weight"})
RESTART_FIELDS = frozenset({"Interval", "Attempts", "Delay", "Mode", "RenderTemplates"})
RESCHEDULE_FIELDS = frozenset(
    {"Attempts", "Interval", "Delay", "DelayFunction", "MaxDelay", "Unlimited"}
)
LOG_FIELDS = frozenset({"MaxFiles", "MaxFileSizeMB", "Disabled", "Enabled"})
PARAMETERIZED_FIELDS = frozenset({"Payload", "MetaRequired", "MetaOptional"})
DISPATCH_FIELDS = frozenset({"JobID", "Payload", "Meta", "IdempotencyToken", "IdPrefixTemplate"})
OPERANDS = frozenset(
    [
        "=",
        "==",
        "is",
        "!=",
        "not",
        ">",
        ">=",
        "<",
        "<=",
        "regexp",
        "version",
        "semver",
        "set_contains",
        "set_contains_any",
        "set_contains_all",
        "distinct_hosts",
        "distinct_property",
        "is_set",
        "is_not_set",
    ]
)
#: Endpoint -> the ACL capability it needs.
READ, SUBMIT, DISPATCH, LOGS = "read-job", "submit-job", "dispatch-job", "read-logs"


class Unknown(ValueError):
    """A field Nomad's API does not define."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _check_fields(obj: Any, allowed: frozenset[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise Unknown(f"{where} must be an object")
    extra = sorted(set(obj) - allowed)
    if extra:
        raise Unknown(f"{where}.{extra[0]} is not a field of Nomad's API")


def check_job_fields(job: dict[str, Any]) -> None:
    """400 for any field the API does not have (the stand-in's strictness, see above)."""
    _check_fields(job, JOB_FIELDS, "Job")
    for i, c in enumerate(job.get("Constraints") or []):
        _check_fields(c, CONSTRAINT_FIELDS, f"Job.Constraints[{i}]")
    for i, a in enumerate(job.get("Affinities") or []):
        _check_fields(a, AFFINITY_FIELDS, f"Job.Affinities[{i}]")
    if job.get("ParameterizedJob") is not None:
        _check_fields(job["ParameterizedJob"], PARAMETERIZED_FIELDS, "Job.ParameterizedJob")
    for g, group in enumerate(job.get("TaskGroups") or []):
        where = f"Job.TaskGroups[{g}]"
        _check_fields(group, GROUP_FIELDS, where)
        if group.get("RestartPolicy") is not None:
            _check_fields(group["RestartPolicy"], RESTART_FIELDS, f"{where}.RestartPolicy")
        if group.get("ReschedulePolicy") is not None:
            _check_fields(group["ReschedulePolicy"], RESCHEDULE_FIELDS, f"{where}.ReschedulePolicy")
        for t, task in enumerate(group.get("Tasks") or []):
            tw = f"{where}.Tasks[{t}]"
            _check_fields(task, TASK_FIELDS, tw)
            if task.get("Resources") is not None:
                _check_fields(task["Resources"], RESOURCE_FIELDS, f"{tw}.Resources")
                for d, dev in enumerate(task["Resources"].get("Devices") or []):
                    _check_fields(dev, DEVICE_FIELDS, f"{tw}.Resources.Devices[{d}]")
            if task.get("LogConfig") is not None:
                _check_fields(task["LogConfig"], LOG_FIELDS, f"{tw}.LogConfig")


def validate_job(job: dict[str, Any]) -> list[str]:
    """What Nomad's job validation would reject (its messages, shortened)."""
    problems: list[str] = []
    job_id = job.get("ID") or ""
    if " " in job_id:
        problems.append("Job ID contains a space")
    if "\x00" in job_id:
        problems.append("Job ID contains a null character")
    if job.get("Type") not in ("service", "batch", "system", "sysbatch"):
        problems.append(f"Invalid job type: {job.get('Type')!r}")
    if not 1 <= int(job.get("Priority") or 50) <= 100:
        problems.append("Job priority must be between [1, 100]")
    if not job.get("Datacenters"):
        problems.append("Missing job datacenters")
    if not job.get("TaskGroups"):
        problems.append("Missing job task groups")
    param = job.get("ParameterizedJob")
    if param is not None:
        if job.get("Type") not in ("batch", "sysbatch"):
            problems.append(
                'Parameterized job can only be used with "batch" or "sysbatch" scheduler'
            )
        if param.get("Payload", "optional") not in ("optional", "required", "forbidden"):
            problems.append(f"Unknown payload requirement: {param.get('Payload')!r}")
    for c in job.get("Constraints") or []:
        if c.get("Operand") not in OPERANDS:
            problems.append(f"Unknown constraint type {c.get('Operand')!r}")
    for group in job.get("TaskGroups") or []:
        gname = group.get("Name") or ""
        if not gname:
            problems.append("Missing task group name")
        if int(group.get("Count") or 0) < 0:
            problems.append(f"Task group {gname} count can't be negative")
        restart = group.get("RestartPolicy") or {}
        if restart and restart.get("Mode") not in ("delay", "fail"):
            problems.append(f"Unsupported restart mode: {restart.get('Mode')!r}")
        if not group.get("Tasks"):
            problems.append(f"Task group {gname} validation failed: Missing tasks for task group")
        for task in group.get("Tasks") or []:
            tname = task.get("Name") or ""
            prefix = f"Task group {gname} validation failed: Task {tname} validation failed"
            if not tname:
                problems.append(f"Task group {gname} validation failed: Missing task name")
            if not task.get("Driver"):
                problems.append(f"{prefix}: Missing task driver")
            if int(task.get("KillTimeout") or 0) < 0:
                problems.append(f"{prefix}: KillTimeout must be a positive value")
            res = task.get("Resources") or {}
            if "CPU" in res and int(res["CPU"]) < 1:
                problems.append(f"{prefix}: minimum CPU value is 1; got {res['CPU']}")
            if "MemoryMB" in res and int(res["MemoryMB"]) < 10:
                problems.append(f"{prefix}: minimum MemoryMB value is 10; got {res['MemoryMB']}")
            if not isinstance(task.get("Config") or {}, dict):
                problems.append(f"{prefix}: Config must be an object")
            for key, value in (task.get("Env") or {}).items():
                if not isinstance(value, str):
                    problems.append(f"{prefix}: Env {key} must be a string")
    return problems


def multierror(problems: list[str]) -> str:
    lines = "".join(f"\n\t* {p}" for p in problems)
    count = f"{len(problems)} error{'s' if len(problems) != 1 else ''} occurred:"
    return f"{count}{lines}\n\n"


@dataclass
class Request:
    """One request the stand-in answered, for assertions."""

    method: str
    path: str
    query: dict[str, str]
    token: str | None
    body: Any
    status: int


class NomadStandIn:
    """Nomad's HTTP API on a free loopback port; see the module docstring."""

    def __init__(
        self,
        images: dict[str, list[str]] | None = None,
        nodes: list[Node] | None = None,
        tokens: dict[str, str] | None = None,
        capabilities: dict[str, set[str]] | None = None,
    ) -> None:
        self.cluster = Cluster(nodes if nodes is not None else [Node("client-1")], images or {})
        self.tokens = tokens
        """secret -> "valid" or "expired"; ``None``: ACLs are off."""
        self.capabilities = capabilities or {}
        """secret -> its namespace capabilities; a token not listed may do everything."""
        self.requests: list[Request] = []
        self._requests_lock = threading.Lock()
        self._local = threading.local()
        self.schedule_delay = 0.05
        self.hold_scheduling = False
        """True: evaluations stay ``pending`` (no scheduler worker takes them)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> NomadStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.cluster.kill_all()

    # -- what tests look at ------------------------------------------------------------------

    def job(self, job_id: str, namespace: str = "default") -> dict[str, Any] | None:
        with self.cluster.lock:
            return self.cluster.jobs.get((namespace, job_id))

    def children(self, parent: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self.cluster.children(parent, namespace)

    def allocations(self, job_id: str, namespace: str = "default") -> list[dict[str, Any]]:
        return self.cluster.job_allocs(namespace, job_id)

    def dispatched(self) -> list[dict[str, Any]]:
        with self.cluster.lock:
            return [j for j in self.cluster.jobs.values() if j.get("Dispatched")]

    def calls(self, method: str, prefix: str) -> list[Request]:
        with self._requests_lock:
            return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def _record(self, request: Request) -> None:
        with self._requests_lock:
            self.requests.append(request)
        self._local.request = request

    def _answered(self, status: int) -> None:
        request = getattr(self._local, "request", None)
        if request is not None:
            request.status = status
            self._local.request = None

    def lose_node(self, name: str) -> list[str]:
        node = next(n for n in self.cluster.nodes if n.name == name)
        return self.cluster.lose_node(node)

    # -- the endpoints -----------------------------------------------------------------------

    def _authorize(self, token: str | None, capability: str) -> None:
        if self.tokens is None:
            return
        if not token:
            raise ApiError(403, "Permission denied")  # anonymous policy: nothing
        state = self.tokens.get(token)
        if state is None:
            raise ApiError(403, "ACL token not found")
        if state == "expired":
            raise ApiError(403, "Permission denied")  # Authenticate rejects expired tokens
        allowed = self.capabilities.get(token)
        if allowed is not None and capability not in allowed:
            raise ApiError(403, "Permission denied")

    def handle(
        self, method: str, raw_path: str, token: str | None, body: bytes
    ) -> tuple[int, Any, str]:
        """(status, JSON-able object or bytes, content type) for one request."""
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        namespace = query.get("namespace") or "default"
        data: Any = None
        if body:
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise ApiError(400, f"Failed to decode request body: {exc}") from None
        self._record(Request(method, path, query, token, data, 0))
        if path in ("/v1/jobs", "/v1/jobs/"):
            if method not in ("PUT", "POST"):
                raise ApiError(405, "Invalid method")  # listing jobs is not used by the runner
            self._authorize(token, SUBMIT)
            return 200, self._register(data, namespace), "application/json"
        if path.startswith("/v1/client/fs/logs/"):
            self._authorize(token, LOGS)
            return self._logs(path.removeprefix("/v1/client/fs/logs/"), query)
        if path.startswith("/v1/job/"):
            rest = path.removeprefix("/v1/job/")
            if rest.endswith("/dispatch"):
                if method not in ("PUT", "POST"):
                    raise ApiError(405, "Invalid method")
                self._authorize(token, DISPATCH)
                job_id = rest.removesuffix("/dispatch")
                return 200, self._dispatch(job_id, data, namespace), "application/json"
            if rest.endswith("/allocations"):
                self._authorize(token, READ)
                job_id = rest.removesuffix("/allocations")
                return 200, self._allocations(namespace, job_id), "application/json"
            if rest.endswith("/evaluations"):
                self._authorize(token, READ)
                job_id = rest.removesuffix("/evaluations")
                return 200, self.cluster.job_evals(namespace, job_id), "application/json"
            if method == "GET":
                self._authorize(token, READ)
                found = self.job(rest, namespace)
                if found is None:
                    raise ApiError(404, "job not found")
                return 200, found, "application/json"
            if method == "DELETE":
                self._authorize(token, SUBMIT)
                purge = query.get("purge", "false").lower() in ("true", "1")
                return 200, self._deregister(rest, namespace, purge), "application/json"
            raise ApiError(405, "Invalid method")
        raise ApiError(404, "")

    def _register(self, data: Any, namespace: str) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("Job"), dict):
            raise ApiError(400, "Job must be specified")
        spec = data["Job"]
        if not spec.get("ID"):
            raise ApiError(400, "Job ID hasn't been provided")
        extra = sorted(
            set(data)
            - {
                "Job",
                "EnforceIndex",
                "JobModifyIndex",
                "PolicyOverride",
                "PreserveCounts",
                "EvalPriority",
                "Submission",
            }
        )
        if extra:
            raise ApiError(400, f"stand-in: {extra[0]} is not a field of JobRegisterRequest")
        try:
            check_job_fields(spec)
        except Unknown as exc:
            raise ApiError(400, f"stand-in: {exc}") from None
        namespace = spec.get("Namespace") or namespace
        problems = validate_job(spec)
        if problems:
            raise ApiError(500, multierror(problems))
        cluster = self.cluster
        with cluster.lock:
            old = cluster.jobs.get((namespace, spec["ID"]))
            job = json.loads(json.dumps(spec))
            job.setdefault("Name", job["ID"])
            job.setdefault("Priority", 50)
            job.setdefault("Meta", None)
            job.update(
                Namespace=namespace,
                ParentID="",
                Dispatched=False,
                DispatchIdempotencyToken="",
                Stop=False,
                Stable=False,
            )
            comparable = {k: v for k, v in job.items()}
            unchanged = old is not None and all(old.get(k) == v for k, v in comparable.items())
            if unchanged:
                assert old is not None
                return {
                    "EvalID": "",
                    "EvalCreateIndex": 0,
                    "JobModifyIndex": old["JobModifyIndex"],
                    "Warnings": "",
                    "Index": 0,
                    "LastContact": 0,
                    "KnownLeader": False,
                }
            index = cluster.next_index()
            job.update(
                Version=(old["Version"] + 1) if old else 0,
                SubmitTime=now_ns(),
                CreateIndex=old["CreateIndex"] if old else index,
                ModifyIndex=index,
                JobModifyIndex=index,
                Status="running" if job.get("ParameterizedJob") else "pending",
                StatusDescription="",
            )
            cluster.jobs[(namespace, job["ID"])] = job
        return {
            "EvalID": "",
            "EvalCreateIndex": 0,
            "JobModifyIndex": index,
            "Warnings": "",
            "Index": index,
            "LastContact": 0,
            "KnownLeader": False,
        }

    def _dispatch(self, job_id: str, data: Any, namespace: str) -> dict[str, Any]:
        data = data or {}
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JobDispatchRequest object")
        extra = sorted(set(data) - DISPATCH_FIELDS)
        if extra:
            raise ApiError(400, f"stand-in: {extra[0]} is not a field of JobDispatchRequest")
        if data.get("JobID") and data["JobID"] != job_id:
            raise ApiError(400, "Job ID does not match")
        cluster = self.cluster
        with cluster.lock:
            parent = cluster.jobs.get((namespace, job_id))
            if parent is None:
                raise ApiError(500, "parameterized job not found")
            if not parent.get("ParameterizedJob") or parent.get("Dispatched"):
                raise ApiError(500, f"Specified job {job_id!r} is not a parameterized job")
            if parent["Stop"]:
                raise ApiError(500, f'Specified job "{job_id}" is stopped')
            param = parent["ParameterizedJob"]
            payload = data.get("Payload") or ""
            if param.get("Payload") == "required" and not payload:
                raise ApiError(500, "Payload is not provided but required by parameterized job")
            if param.get("Payload") == "forbidden" and payload:
                raise ApiError(500, "Payload provided but forbidden by parameterized job")
            meta = data.get("Meta") or {}
            if not all(isinstance(v, str) for v in meta.values()):
                raise ApiError(400, "Meta values must be strings")
            known = set(param.get("MetaRequired") or []) | set(param.get("MetaOptional") or [])
            unpermitted = sorted(k for k in meta if k not in known)
            if unpermitted:
                raise ApiError(
                    500, f"Dispatch request included unpermitted metadata keys: {unpermitted}"
                )
            missing = sorted(k for k in param.get("MetaRequired") or [] if k not in meta)
            if missing:
                raise ApiError(500, f"Dispatch did not provide required meta keys: {missing}")
            token = data.get("IdempotencyToken") or ""
            if token:
                for child in cluster.children(job_id, namespace):
                    if child["DispatchIdempotencyToken"] == token:
                        return {
                            "DispatchedJobID": child["ID"],
                            "EvalID": "",
                            "EvalCreateIndex": 0,
                            "JobCreateIndex": child["CreateIndex"],
                            "Index": child["ModifyIndex"],
                        }
            index = cluster.next_index()
            child = json.loads(json.dumps(parent))
            child_id = f"{job_id}/dispatch-{int(time.time())}-{uuid.uuid4().hex[:8]}"
            child.update(
                ID=child_id,
                Name=child_id,
                ParentID=job_id,
                Dispatched=True,
                DispatchIdempotencyToken=token,
                Status="pending",
                StatusDescription="",
                SubmitTime=now_ns(),
                CreateIndex=index,
                ModifyIndex=index,
                JobModifyIndex=index,
                Version=0,
                Payload=payload or None,
                Meta={**(parent.get("Meta") or {}), **meta},
            )
            cluster.jobs[(namespace, child_id)] = child
            ev = cluster.new_eval(child, "job-register")
        if not self.hold_scheduling:
            timer = threading.Timer(self.schedule_delay, cluster.schedule, args=(ev["ID"],))
            timer.daemon = True
            timer.start()
        return {
            "DispatchedJobID": child_id,
            "EvalID": ev["ID"],
            "EvalCreateIndex": ev["CreateIndex"],
            "JobCreateIndex": index,
            "Index": ev["CreateIndex"],
        }

    def _allocations(self, namespace: str, job_id: str) -> list[dict[str, Any]]:
        with self.cluster.lock:
            allocs = self.cluster.job_allocs(namespace, job_id)
            return [
                json.loads(json.dumps({k: v for k, v in a.items() if not k.startswith("_")}))
                for a in allocs
            ]

    def _deregister(self, job_id: str, namespace: str, purge: bool) -> dict[str, Any]:
        cluster = self.cluster
        with cluster.lock:
            job = cluster.jobs.get((namespace, job_id))
            if job is None:
                return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "Index": 0}
            index = cluster.next_index()
            job["Stop"] = True
            job["ModifyIndex"] = index
            job["JobModifyIndex"] = index
            eval_id = ""
            if not (job.get("ParameterizedJob") and not job.get("Dispatched")):
                ev = cluster.new_eval(job, "job-deregister", status="complete")
                eval_id = ev["ID"]
            for ev in cluster.job_evals(namespace, job_id):
                if ev["Status"] in ("blocked", "pending") and ev["ID"] != eval_id:
                    ev["Status"] = "canceled"
            allocs = [a["ID"] for a in cluster.job_allocs(namespace, job_id)]
        for alloc_id in allocs:
            cluster.stop_alloc(alloc_id, "alloc not needed due to job update")
        with cluster.lock:
            if purge:
                cluster.jobs.pop((namespace, job_id), None)
                for alloc_id in allocs:
                    run = cluster.running.get(alloc_id)
                    if run is not None and run.proc is not None and run.proc.poll() is None:
                        continue  # still being killed: the client removes it when it is dead
                    cluster.allocs.pop(alloc_id, None)
                for ev in cluster.job_evals(namespace, job_id):
                    cluster.evals.pop(ev["ID"], None)
            elif all(cluster._terminal(cluster.allocs[a]) for a in allocs):
                job["Status"] = "dead"
        return {
            "EvalID": eval_id,
            "EvalCreateIndex": index if eval_id else 0,
            "JobModifyIndex": index,
            "VolumeEvalID": "",
            "VolumeEvalIndex": 0,
            "Index": index,
        }

    def _logs(self, alloc_id: str, query: dict[str, str]) -> tuple[int, Any, str]:
        cluster = self.cluster
        with cluster.lock:
            alloc = cluster.allocs.get(alloc_id)
            run = cluster.running.get(alloc_id)
            node = next((n for n in cluster.nodes if alloc and n.id == alloc["NodeID"]), None)
        if alloc is None or run is None:
            raise ApiError(404, f'Unknown allocation "{alloc_id}"')
        task = query.get("task", "")
        if not task:
            raise ApiError(400, "must include task name")
        if task not in alloc["TaskStates"]:
            raise ApiError(400, f'unknown task name "{task}"')
        kind = query.get("type", "")
        if kind not in ("stdout", "stderr"):
            raise ApiError(400, 'must include log type ("stdout" or "stderr")')
        origin = query.get("origin", "start")
        if origin not in ("start", "end"):
            raise ApiError(400, 'origin must be "start" or "end"')
        if query.get("follow", "false").lower() in ("true", "1"):
            raise ApiError(400, "stand-in: follow=true is not implemented (the runner polls)")
        try:
            offset = int(query.get("offset", "0"))
        except ValueError:
            raise ApiError(400, "Failed to parse offset") from None
        if node is None or not node.up:
            raise ApiError(500, "No path to node")
        if run.folder is None:
            raise ApiError(404, f'log entry for task "{task}" and log type "{kind}" not found')
        path: Path = run.folder / "alloc" / "logs" / f"{task}.{kind}.0"
        if not path.exists():
            raise ApiError(404, f'log entry for task "{task}" and log type "{kind}" not found')
        data = path.read_bytes()
        start = max(0, len(data) - offset) if origin == "end" else min(offset, len(data))
        chunk = data[start:]
        if query.get("plain", "false").lower() in ("true", "1"):
            return 200, chunk, "text/plain; charset=utf-8"
        frame = {
            "Data": base64.b64encode(chunk).decode(),
            "File": f"alloc/logs/{task}.{kind}.0",
            "Offset": len(data),
        }
        return 200, frame, "application/json"

    # -- HTTP --------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                token = self.headers.get("X-Nomad-Token")
                try:
                    status, obj, ctype = standin.handle(self.command, self.path, token, body)
                except ApiError as exc:
                    status, obj, ctype = (
                        exc.status,
                        exc.message.encode(),
                        "text/plain; charset=utf-8",
                    )
                except Exception as exc:  # a bug in the stand-in: say so, as a 500
                    status, obj = 500, f"stand-in failure: {exc.__class__.__name__}: {exc}".encode()
                    ctype = "text/plain; charset=utf-8"
                standin._answered(status)
                payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                if status == 200 and self.command == "GET":
                    self.send_header("X-Nomad-Index", str(standin.cluster.index))
                    self.send_header("X-Nomad-KnownLeader", "true")
                    self.send_header("X-Nomad-LastContact", "0")
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = _serve

        return Handler


@contextmanager
def running_standin(**kwargs: Any) -> Iterator[NomadStandIn]:
    """A started stand-in, stopped (and every task it started killed) afterwards."""
    standin = NomadStandIn(**kwargs).start()
    try:
        yield standin
    finally:
        standin.stop()


__all__ = ["SECOND_NS", "Node", "NomadStandIn", "new_id", "running_standin"]
