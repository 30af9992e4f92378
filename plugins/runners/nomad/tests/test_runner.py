"""The nomad runner against the Nomad stand-in: each way a run can end, and following it.

In these tests the stand-in really runs the module's work: a task's image names a Python
script (``module_script``), which the stand-in starts with the task's environment, reading
and writing the run's folders through the shared folder as the Nomad clients see it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from mercure.runners import ProcessingRun, RunnerError, RunnerUnavailable
from mercure.testing import wait_for
from mercure_runner_nomad import NomadRunner
from mercure_runner_nomad.runner import MARKER
from nomad_standin import NomadStandIn
from nomad_testing import Shared, module_script, outcome_of

Make = Callable[..., NomadRunner]
Prepare = Callable[..., ProcessingRun]

WRITER = """
import json, os, sys
inp, out = os.environ["MERCURE_IN_DIR"], os.environ["MERCURE_OUT_DIR"]
report = {
    "env": {k: v for k, v in os.environ.items() if k.startswith(("MERCURE", "MONAI", "HOLOSCAN",
            "MODULE", "NOMAD_META", "EXTRA"))},
    "inputs": sorted(os.listdir(inp)),
    "task": json.load(open(os.path.join(inp, "task.json"))),
}
with open(os.path.join(out, "report.json"), "w") as fh:
    json.dump(report, fh)
with open(os.path.join(out, "runs.txt"), "a") as fh:
    fh.write("ran\\n")
print("module output on stdout")
print("module warning on stderr", file=sys.stderr)
"""

SLEEPER = """
import os, pathlib, signal, sys, time
out = pathlib.Path(os.environ["MERCURE_OUT_DIR"])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
(out / "pid").write_text(str(os.getpid()))
with open(out / "runs.txt", "a") as fh:
    fh.write("ran\\n")
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def started_pid(run: ProcessingRun) -> int:
    pid_file = run.output_folder / "pid"
    wait_for(pid_file.exists, timeout=30, what="the module to start")
    return int(wait_for(lambda: pid_file.read_text().strip(), timeout=5, what="its pid"))


def test_a_run_is_a_dispatch_whose_task_works_in_the_shared_folder(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, shared: Shared, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(environment={"EXTRA_FROM_RUNNER": "yes"})
    # The processor parses the module's environment into run.environment.
    run = replace(prepared("example/writer:1"), environment={"EXTRA_FROM_MODULE": "1"})

    handle = runner.launch(run)
    outcome = outcome_of(runner, handle)

    assert outcome.succeeded, outcome
    assert outcome.exit_code == 0 and outcome.error is None
    assert "module output on stdout" in outcome.log
    assert "module warning on stderr" in outcome.log
    assert outcome.log.index("stdout") < outcome.log.index("[stderr]")
    # The task's work landed in the router's output folder, through the shared folder.
    report = json.loads((run.output_folder / "report.json").read_text())
    assert report["inputs"] == ["1.2.3#a.dcm", "task.json"]
    assert report["task"] == {"id": "task-mod"}
    env = report["env"]
    assert env["EXTRA_FROM_RUNNER"] == "yes" and env["EXTRA_FROM_MODULE"] == "1"
    assert env["NOMAD_META_mercure_run_id"] == run.run_id
    # The dispatch carried the client's view of the folders; the job mounts them where
    # mercure mounts them and gives mercure's variables for those paths.
    info = json.loads(handle)
    child = standin.job(info["job"])
    assert child is not None and child["ParentID"] == info["parent"]
    assert child["Meta"]["mercure_in"] == str(
        shared.client / run.input_folder.relative_to(shared.router)
    )
    assert child["Meta"]["mercure_out"].startswith(str(shared.client) + "/")
    assert child["DispatchIdempotencyToken"] == run.run_id
    task = child["TaskGroups"][0]["Tasks"][0]
    assert task["Driver"] == "docker"
    assert task["Config"]["image"] == "example/writer:1"
    assert [(m["type"], m["target"]) for m in task["Config"]["mount"]] == [
        ("bind", "/tmp/data"),
        ("bind", "/tmp/output"),
    ]
    assert task["Config"]["network_mode"] == "none"
    assert task["User"] == f"{os.getuid()}:{os.getgid()}"
    assert task["Env"]["MERCURE_IN_DIR"] == "/tmp/data"
    assert task["Env"]["MONAI_OUTPUTPATH"] == "/tmp/output"
    assert task["Resources"] == {"CPU": 500, "MemoryMB": 1024}
    group = child["TaskGroups"][0]
    assert group["RestartPolicy"]["Attempts"] == 0 and group["ReschedulePolicy"]["Attempts"] == 0
    # The registered job is a parameterized batch job named after the module and its hash.
    parent = standin.job(info["parent"])
    assert parent is not None and parent["Type"] == "batch"
    assert parent["ParameterizedJob"]["MetaRequired"] == [
        "mercure_in",
        "mercure_out",
        "mercure_run_id",
    ]
    assert info["parent"].startswith("mercure-mod-")
    assert parent["Meta"]["mercure_definition"] in info["parent"]
    # cleanup purges the dispatched job; the module's job stays for the next run.
    runner.cleanup(handle)
    assert standin.job(info["job"]) is None
    assert standin.job(info["parent"]) is not None
    assert (run.output_folder / "report.json").exists()  # cleanup never touches the output


def test_a_non_zero_exit_is_the_modules_exit_code_with_its_log(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/fails:1"] = module_script(
        tmp_path,
        "fails",
        """
        import sys
        print("reading the series")
        print("Traceback: no pixel data", file=sys.stderr)
        sys.exit(3)
        """,
    )
    runner = make_runner()
    outcome = outcome_of(runner, runner.launch(prepared("example/fails:1")))
    assert not outcome.succeeded
    assert outcome.exit_code == 3 and outcome.error is None
    assert "reading the series" in outcome.log and "no pixel data" in outcome.log


def test_an_image_nomad_cannot_pull_fails_with_the_drivers_reason(
    make_runner: Make, prepared: Prepare
) -> None:
    runner = make_runner()
    outcome = outcome_of(runner, runner.launch(prepared("example/missing:9")))
    assert outcome.exit_code is None
    assert outcome.error is not None
    assert "Driver Failure" in outcome.error
    assert "Failed to pull `example/missing:9`" in outcome.error


def test_a_lost_allocation_fails_the_run_and_its_replacement_is_stopped(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/sleeps:1"] = module_script(tmp_path, "sleeps", SLEEPER)
    runner = make_runner()
    run = prepared("example/sleeps:1")
    handle = runner.launch(run)
    first_pid = started_pid(run)
    job_id = json.loads(handle)["job"]
    first = standin.allocations(job_id)[0]
    (run.output_folder / "pid").unlink()

    standin.lose_node(first["NodeName"])  # its client stops heartbeating; Nomad replaces it

    outcome = outcome_of(runner, handle)
    assert outcome.exit_code is None and outcome.error is not None
    assert f"Nomad lost allocation {first['ID'][:8]}" in outcome.error
    assert "alloc is lost since its node is down" in outcome.error
    assert "could not be fetched" in outcome.log  # the node is gone, and its logs with it
    job = standin.job(job_id)
    assert job is not None and job["Stop"], "the runner stops the job: no second run"
    allocs = standin.allocations(job_id)
    assert len(allocs) == 2
    replacement = next(a for a in allocs if a["ID"] != first["ID"])
    assert replacement["DesiredStatus"] == "stop"
    wait_for(lambda: replacement["ClientStatus"] == "complete", timeout=30, what="the kill")
    assert not alive(first_pid)
    if (run.output_folder / "pid").exists():
        assert not alive(int((run.output_folder / "pid").read_text()))


def test_a_job_nomad_never_places_fails_with_the_placement_failure_and_is_stopped(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(placement_timeout=1.0)
    windows = prepared(
        "example/writer:1",
        name="win",
        constraints='constraint {\n  attribute = "${attr.kernel.name}"\n  value = "windows"\n}',
    )
    big = prepared("example/writer:1", name="big", resources="memory = 999999")

    handle = runner.launch(windows)
    assert runner.wait(handle, 0.2) is None  # within the bound: still waiting to be placed
    outcome = outcome_of(runner, handle)
    assert outcome.exit_code is None and outcome.error is not None
    assert "did not place job" in outcome.error and "within 1 s" in outcome.error
    assert 'constraint "${attr.kernel.name} = windows" filtered 2 node(s)' in outcome.error
    job = standin.job(json.loads(handle)["job"])
    assert job is not None and job["Stop"], "stopped, so that it is not placed later"
    assert not (windows.output_folder / "report.json").exists()

    outcome = outcome_of(runner, runner.launch(big))
    assert outcome.error is not None
    assert 'dimension "memory" exhausted on 2 node(s)' in outcome.error


def test_a_job_placed_once_resources_free_up_runs(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/sleeps:1"] = module_script(tmp_path, "sleeps", SLEEPER)
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    for node in standin.cluster.nodes:
        node.memory = 1500  # room for one run of 1024 MB per node
    runner = make_runner()
    busy = [prepared("example/sleeps:1", name=f"busy{i}") for i in range(2)]
    busy_handles = [runner.launch(run) for run in busy]
    for run in busy:
        started_pid(run)
    waiting = prepared("example/writer:1", name="waiting")
    handle = runner.launch(waiting)
    assert runner.wait(handle, 0.5) is None  # blocked: Nomad waits for memory
    runner.cancel(busy_handles[0])
    outcome = outcome_of(runner, handle)
    assert outcome.succeeded, outcome
    assert (waiting.output_folder / "report.json").exists()
    for h in busy_handles:
        runner.cancel(h)


def test_an_expired_or_unknown_token_is_a_runner_error_naming_the_token(
    make_runner: Make,
    prepared: Prepare,
    standin: NomadStandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin.tokens = {"s3cr3t-valid": "valid", "s3cr3t-old": "expired"}
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    run = prepared("example/writer:1")

    with pytest.raises(RunnerError) as expired:
        make_runner(token="s3cr3t-old").launch(run)
    message = str(expired.value)
    assert "403 Permission denied" in message
    assert "plugins.runners.nomad.token" in message
    assert "expired" in message
    assert "s3cr3t" not in message  # the secret itself is never shown

    with pytest.raises(RunnerError, match="403 ACL token not found"):
        make_runner(token="s3cr3t-unknown").launch(run)
    with pytest.raises(RunnerError, match="no ACL token is set"):
        make_runner().launch(run)
    assert not standin.dispatched()

    monkeypatch.setenv("TEST_NOMAD_TOKEN", "s3cr3t-valid")
    runner = make_runner(token="${env:TEST_NOMAD_TOKEN}")  # a secret reference
    handle = runner.launch(run)
    assert outcome_of(runner, handle).succeeded
    assert {r.token for r in standin.requests if r.status == 200} == {"s3cr3t-valid"}

    # A token that expires while the run goes on: following it is a retryable RunnerError.
    standin.tokens["s3cr3t-valid"] = "expired"
    with pytest.raises(RunnerError, match="403 Permission denied"):
        runner.wait(handle, 0.1)


def test_a_new_runner_instance_follows_a_run_by_its_handle(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/slow:1"] = module_script(
        tmp_path,
        "slow",
        """
        import os, time
        time.sleep(1.0)
        open(os.path.join(os.environ["MERCURE_OUT_DIR"], "done"), "w").write("yes")
        print("finished after a restart of the processor")
        """,
    )
    first = make_runner()
    run = prepared("example/slow:1")
    handle = first.launch(run)
    assert first.wait(handle, 0.1) is None
    first.close()  # the processor stops; the job keeps running in Nomad

    second = make_runner()  # a new processor (on any host sharing the spool)
    outcome = outcome_of(second, handle)
    assert outcome.succeeded, outcome
    assert "finished after a restart" in outcome.log
    assert (run.output_folder / "done").read_text() == "yes"
    second.cleanup(handle)
    assert standin.job(json.loads(handle)["job"]) is None


def test_launch_is_idempotent_per_run_id(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    run = prepared("example/writer:1")
    handle = make_runner().launch(run)
    # A processor restarted before it wrote the handle launches again: the run folder's
    # marker gives the same dispatch.
    assert make_runner().launch(run) == handle
    # Even without the marker (it died between the dispatch and the marker), the dispatch's
    # idempotency token makes Nomad return the same job, and nothing runs twice.
    (run.run_folder / MARKER).unlink()  # type: ignore[operator]
    runner = make_runner()
    assert json.loads(runner.launch(run))["job"] == json.loads(handle)["job"]
    assert outcome_of(runner, handle).succeeded
    assert len(standin.dispatched()) == 1
    assert (run.output_folder / "runs.txt").read_text() == "ran\n"
    # A new attempt (another run_id) is a new dispatch of the same registered job.
    again = prepared("example/writer:1", step=1)
    other = runner.launch(again)
    assert json.loads(other)["job"] != json.loads(handle)["job"]
    assert json.loads(other)["parent"] == json.loads(handle)["parent"]


def test_one_registration_per_module_version(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner()
    h1 = runner.launch(prepared("example/writer:1", name="m", step=0))
    h2 = runner.launch(prepared("example/writer:1", name="m", step=1))
    assert json.loads(h1)["parent"] == json.loads(h2)["parent"]
    assert len(standin.calls("PUT", "/v1/jobs")) == 1
    changed = prepared("example/writer:1", name="m", step=2, resources="memory = 2048")
    h3 = runner.launch(changed)
    assert json.loads(h3)["parent"] != json.loads(h1)["parent"]
    parent = standin.job(json.loads(h3)["parent"])
    assert parent is not None
    assert parent["TaskGroups"][0]["Tasks"][0]["Resources"] == {"CPU": 500, "MemoryMB": 2048}
    for h in (h1, h2, h3):
        assert outcome_of(runner, h).succeeded

    # A registered job stopped meanwhile (by an operator) is registered again.
    standin.cluster.jobs[("default", json.loads(h1)["parent"])]["Stop"] = True
    h4 = runner.launch(prepared("example/writer:1", name="m", step=3))
    assert outcome_of(runner, h4).succeeded


def test_cancel_stops_the_job_and_the_task_is_killed(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/sleeps:1"] = module_script(tmp_path, "sleeps", SLEEPER)
    runner = make_runner()
    run = prepared("example/sleeps:1")
    handle = runner.launch(run)
    pid = started_pid(run)
    runner.cancel(handle)
    runner.cancel(handle)  # repeated by the processor: harmless
    outcome = outcome_of(runner, handle)
    assert outcome.exit_code is None
    assert outcome.error is not None and outcome.error.startswith("cancelled")
    assert not alive(pid)
    job_id = json.loads(handle)["job"]
    deletes = standin.calls("DELETE", f"/v1/job/{job_id}")
    assert deletes and all(r.query.get("purge") is None for r in deletes)
    runner.cleanup(handle)
    assert standin.job(job_id) is None


def test_cancel_of_a_task_that_ignores_sigterm_kills_it(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/stubborn:1"] = module_script(tmp_path, "sleeps", SLEEPER)
    runner = make_runner(kill_timeout=0.5, environment={"IGNORE_TERM": "1"})
    run = prepared("example/stubborn:1")
    handle = runner.launch(run)
    pid = started_pid(run)
    runner.cancel(handle)
    outcome = outcome_of(runner, handle)
    assert outcome.error is not None and "cancelled" in outcome.error and "SIGKILL" in outcome.error
    assert not alive(pid)


def test_cancel_before_placement(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare
) -> None:
    standin.hold_scheduling = True
    runner = make_runner()
    handle = runner.launch(prepared("example/writer:1"))
    assert runner.wait(handle, 0.2) is None
    runner.cancel(handle)
    outcome = outcome_of(runner, handle)
    assert outcome.error == "cancelled (Nomad stopped the job before placing it)"


def test_a_pending_evaluation_past_the_bound_says_so(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare
) -> None:
    standin.hold_scheduling = True  # no scheduler takes the evaluation
    runner = make_runner(placement_timeout=0.5)
    outcome = outcome_of(runner, runner.launch(prepared("example/writer:1")))
    assert outcome.error is not None
    assert "did not place job" in outcome.error and "evaluation is pending" in outcome.error


def test_persistence_folder_is_mounted_and_kept(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, shared: Shared, tmp_path: Path
) -> None:
    standin.cluster.images["example/counter:1"] = module_script(
        tmp_path,
        "counter",
        """
        import os, pathlib
        store = pathlib.Path(os.environ["MODULE_PERSISTENCE_DIR"])
        count = store / "count"
        count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
        """,
    )
    runner = make_runner()
    folder = shared.router / "persistence" / "counter"
    for step in (0, 1):
        run = prepared(
            "example/counter:1", step=step, requires_persistence=True, persistence_folder=folder
        )
        assert outcome_of(runner, runner.launch(run)).succeeded
    assert (folder / "count").read_text() == "2"
    parent = standin.job(json.loads(runner.launch(run))["parent"])
    assert parent is not None
    task = parent["TaskGroups"][0]["Tasks"][0]
    assert task["Env"]["MODULE_PERSISTENCE_DIR"] == "/tmp/persistence"
    assert "mercure_persistence" in parent["ParameterizedJob"]["MetaRequired"]


def test_folders_outside_the_shared_folders_are_refused(
    make_runner: Make, prepared: Prepare, standin: NomadStandIn, tmp_path: Path
) -> None:
    runner = make_runner(shared_folders={str(tmp_path / "elsewhere"): "/mnt/elsewhere"})
    with pytest.raises(RunnerError) as refused:
        runner.launch(prepared("example/writer:1"))
    assert "not below any folder of plugins.runners.nomad.shared_folders" in str(refused.value)
    assert not standin.dispatched()


def test_a_mapping_to_a_path_the_clients_lack_fails_the_task_loudly(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, shared: Shared, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(shared_folders={str(shared.router): "/no/such/mount"})
    outcome = outcome_of(runner, runner.launch(prepared("example/writer:1")))
    assert outcome.error is not None
    assert "bind source path does not exist: /no/such/mount/processing" in outcome.error


def test_root_only_when_allowed(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    runner = make_runner()
    with pytest.raises(RunnerError, match="support_root_modules"):
        runner.launch(prepared("example/writer:1", requires_root=True))
    handle = runner.launch(prepared("example/writer:1", requires_root=True, allow_root=True))
    parent = standin.job(json.loads(handle)["parent"])
    assert parent is not None and parent["TaskGroups"][0]["Tasks"][0]["User"] == "root"


def test_network_only_when_the_module_asks(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare
) -> None:
    handle = make_runner().launch(prepared("example/writer:1", network_enabled=True))
    parent = standin.job(json.loads(handle)["parent"])
    assert parent is not None
    assert "network_mode" not in parent["TaskGroups"][0]["Tasks"][0]["Config"]


def test_the_end_of_a_long_log_is_kept(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/chatty:1"] = module_script(
        tmp_path,
        "chatty",
        """
        for i in range(20000):
            print(f"line {i:05d}")
        """,
    )
    runner = make_runner(max_log_bytes=4096)
    outcome = outcome_of(runner, runner.launch(prepared("example/chatty:1")))
    assert outcome.succeeded
    assert outcome.log.startswith("[... earlier stdout not fetched ...]\n")
    assert outcome.log.rstrip().endswith("line 19999")
    assert len(outcome.log) < 4200


def test_a_podman_driver_gets_volumes(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(driver="podman")
    run = prepared("example/writer:1")
    handle = runner.launch(run)
    assert outcome_of(runner, handle).succeeded
    parent = standin.job(json.loads(handle)["parent"])
    assert parent is not None
    config = parent["TaskGroups"][0]["Tasks"][0]["Config"]
    assert config["volumes"] == [
        "${NOMAD_META_mercure_in}:/tmp/data",
        "${NOMAD_META_mercure_out}:/tmp/output",
    ]
    assert (run.output_folder / "report.json").exists()


def test_a_purged_job_has_an_outcome_that_says_so(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare
) -> None:
    standin.hold_scheduling = True
    runner = make_runner()
    handle = runner.launch(prepared("example/writer:1"))
    standin.cluster.jobs.pop(("default", json.loads(handle)["job"]))
    outcome = outcome_of(runner, handle)
    assert outcome.error is not None and "Nomad has no job" in outcome.error


def test_nomad_down_is_unavailable_and_following_is_retried(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    address = standin.address
    runner = make_runner(address="http://127.0.0.1:1", request_timeout=2)
    with pytest.raises(RunnerUnavailable, match=r"cannot reach Nomad at http://127.0.0.1:1"):
        runner.launch(prepared("example/writer:1"))
    good = make_runner(address=address)
    handle = good.launch(prepared("example/writer:1", name="ok"))
    with pytest.raises(RunnerError, match="cannot reach Nomad"):
        runner.wait(handle, 0.1)
    assert outcome_of(good, handle).succeeded


def test_a_run_in_another_namespace_is_followed_there(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(namespace="imaging", datacenters=["dc1"])
    handle = runner.launch(prepared("example/writer:1"))
    assert json.loads(handle)["namespace"] == "imaging"
    assert standin.job(json.loads(handle)["job"], namespace="imaging") is not None
    # Settings changed since: the handle still names the run's namespace.
    assert outcome_of(make_runner(namespace="default"), handle).succeeded
    assert {r.query.get("namespace") for r in standin.requests} == {"imaging"}


def test_keep_finished_jobs(
    standin: NomadStandIn, make_runner: Make, prepared: Prepare, tmp_path: Path
) -> None:
    standin.cluster.images["example/writer:1"] = module_script(tmp_path, "writer", WRITER)
    runner = make_runner(keep_finished_jobs=True)
    handle = runner.launch(prepared("example/writer:1"))
    assert outcome_of(runner, handle).succeeded
    runner.cleanup(handle)
    assert standin.job(json.loads(handle)["job"]) is not None


def test_a_handle_of_another_runner_is_refused(make_runner: Make) -> None:
    with pytest.raises(RunnerError, match="not a handle of the nomad runner"):
        make_runner().wait('{"folder": "/x"}', 0.1)
    with pytest.raises(RunnerError, match="not a handle of the nomad runner"):
        make_runner().cancel("garbage")
