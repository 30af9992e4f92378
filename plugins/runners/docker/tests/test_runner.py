"""The docker runner against a real engine: launch, wait, cancel, cleanup, re-attach, safety.

Each test prepares a run as the processor does (an input folder with instances and
``task.json``, an empty output folder, a run folder) and drives the runner through the
contract's calls, then looks at what the engine and the folders show.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest
from docker_support import DockerEngine
from mercure.config import Module
from mercure.lifecycle import PluginContext
from mercure.runners import ProcessingRun, RunnerError, RunnerUnavailable, RunOutcome
from mercure.testing import make_series
from mercure_runner_docker import DockerRunner, DockerRunnerSettings
from mercure_runner_docker.runner import L_RUN_ID, L_RUNNER

pytestmark = [pytest.mark.peer]


def make_runner(
    engine: DockerEngine, tmp_path: Path, name: str = "docker", **settings: Any
) -> DockerRunner:
    runner = DockerRunner(
        name,
        DockerRunnerSettings(docker_url=engine.url, **settings),
        PluginContext("runner", name, state_folder=tmp_path / "state"),
    )
    runner.start()
    return runner


def make_run(
    tmp_path: Path,
    image: str,
    *,
    run_id: str = "job1-a1-s0",
    env: dict[str, str] | None = None,
    marker: str = "m-42",
    **module: Any,
) -> ProcessingRun:
    job = tmp_path / "job" / run_id
    in_dir, out_dir, run_dir = job / "in", job / "out", job / "run"
    make_series(in_dir, 2)
    out_dir.mkdir()
    run_dir.mkdir()
    settings = {"marker": marker}
    task = {"id": "job1", "process": {"module_name": "busy", "settings": settings}}
    (in_dir / "task.json").write_text(json.dumps(task))
    return ProcessingRun(
        task_id="job1",
        module_name="busy",
        module=Module(docker_tag=image, **module),
        input_folder=in_dir,
        output_folder=out_dir,
        settings=settings,
        environment=env or {},
        run_id=run_id,
        run_folder=run_dir,
    )


def wait_outcome(runner: DockerRunner, handle: str, timeout: float = 60) -> RunOutcome:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = runner.wait(handle, 1.0)
        if outcome is not None:
            return outcome
    raise AssertionError(f"the run did not end within {timeout} s")


def containers_of(client: docker.DockerClient, run_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{L_RUN_ID}={run_id}"})


def result_of(run: ProcessingRun) -> dict[str, Any]:
    return dict(json.loads((run.output_folder / "result.json").read_text()))


def test_a_module_runs_confined_and_its_output_is_the_routers(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    runner = make_runner(docker_engine, tmp_path, mem_limit="64m", cpus=0.5, pids_limit=64)
    run = make_run(tmp_path, module_image, env={"GREETING": "hello"})
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.succeeded, outcome
    assert "copied 2 instance(s)" in outcome.log and "module starting" in outcome.log

    result = result_of(run)
    assert result["uid"] != 0 and result["gid"] != 0  # never root
    assert result["uid"] == (os.geteuid() or 65534)  # the router's, nobody for a root router
    assert result["copied"] == 2 and result["marker"] == "m-42"  # task.json was read
    assert result["in_dir"] == "/tmp/data" and result["out_dir"] == "/tmp/output"
    assert "unreachable" in result["network"].lower() and "exit 0" not in result["network"]
    for path in [run.output_folder, *run.output_folder.iterdir()]:
        assert path.stat().st_uid == os.geteuid(), path  # given back to the router's user

    (container,) = containers_of(docker_client, run.run_id)
    host = container.attrs["HostConfig"]
    assert container.name == "mercure-job1-a1-s0"
    assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]
    assert host["Memory"] == 64 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 64 and "no-new-privileges:true" in host["SecurityOpt"]
    assert container.attrs["Config"]["Env"].count("GREETING=hello") == 1
    runner.cleanup(handle)
    assert containers_of(docker_client, run.run_id) == []
    runner.close()


def test_exit_codes_and_logs_come_back(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path)
    run = make_run(tmp_path, module_image, env={"BEHAVIOUR": "fail"})
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.exit_code == 3 and outcome.error is None
    assert "failing on purpose" in outcome.log
    runner.cleanup(handle)


def test_launch_twice_starts_one_container_and_a_new_instance_follows_it(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    runs = tmp_path / "persist"
    first = make_runner(docker_engine, tmp_path)
    run = make_run(tmp_path, module_image, env={"SLEEP": "2", "RUNS": "/tmp/persistence/runs.txt"})
    run = replace(run, persistence_folder=runs)
    handle = first.launch(run)
    again = first.launch(run)  # the processor died before it wrote the handle
    assert json.loads(again)["container"] == json.loads(handle)["container"]
    first.close()  # the processor stops; the container goes on

    second = make_runner(docker_engine, tmp_path)  # a restarted processor
    assert second.launch(run) == handle
    outcome = wait_outcome(second, handle)
    assert outcome.succeeded, outcome
    assert [line.split()[0] for line in (runs / "runs.txt").read_text().splitlines()] == [
        "start",
        "end",
    ]
    assert result_of(run)["persistence"] == "/tmp/persistence"
    assert len(containers_of(docker_client, run.run_id)) == 1
    second.cleanup(handle)
    assert containers_of(docker_client, run.run_id) == []


def test_a_container_created_but_never_started_is_started_by_the_next_launch(
    docker_engine: DockerEngine,
    module_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = make_run(tmp_path, module_image)
    crashing = make_runner(docker_engine, tmp_path)

    def die(*_args: Any) -> None:
        raise KeyboardInterrupt("processor killed between create and start")

    monkeypatch.setattr(crashing, "_start", die)
    with pytest.raises(KeyboardInterrupt):
        crashing.launch(run)
    fresh = make_runner(docker_engine, tmp_path)
    handle = fresh.launch(run)
    outcome = wait_outcome(fresh, handle)
    assert outcome.succeeded, outcome
    assert result_of(run)["copied"] == 2
    fresh.cleanup(handle)


def test_cancel_stops_the_container_and_cleanup_removes_it(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    runner = make_runner(docker_engine, tmp_path)
    run = make_run(tmp_path, module_image, env={"BEHAVIOUR": "hang"})
    handle = runner.launch(run)
    assert runner.wait(handle, 1.0) is None
    runner.cancel(handle)
    outcome = wait_outcome(runner, handle, 30)
    assert outcome.exit_code is None
    assert outcome.error is not None and outcome.error.startswith("cancelled (sent SIGTERM")
    assert "hanging" in outcome.log
    runner.cleanup(handle)
    assert containers_of(docker_client, run.run_id) == []


def test_a_module_that_ignores_sigterm_is_killed_on_a_later_cancel(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path, kill_grace=1)
    run = make_run(tmp_path, module_image, env={"BEHAVIOUR": "stubborn"})
    handle = runner.launch(run)
    assert runner.wait(handle, 1.0) is None
    runner.cancel(handle)
    assert runner.wait(handle, 1.5) is None  # it ignores SIGTERM
    outcome = None
    deadline = time.monotonic() + 30
    while outcome is None and time.monotonic() < deadline:
        runner.cancel(handle)  # the processor repeats it
        outcome = runner.wait(handle, 1.0)
    assert outcome is not None and outcome.error is not None
    assert "sent SIGKILL" in outcome.error and "ignoring SIGTERM" in outcome.log
    runner.cleanup(handle)


def test_a_missing_image_is_an_error_that_names_it(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path)
    run = make_run(tmp_path, "example.invalid/no-such-module:9")
    with pytest.raises(RunnerError, match=r"'example\.invalid/no-such-module:9' is not on the"):
        runner.launch(run)
    pulling = make_runner(docker_engine, tmp_path, name="pulling", pull_policy="missing")
    with pytest.raises(RunnerError) as caught:
        pulling.launch(make_run(tmp_path, "example.invalid/no-such-module:9", run_id="x-a1-s0"))
    assert "no-such-module:9" in str(caught.value) and "pulling it failed" in str(caught.value)


def test_hourly_pulls_at_most_once_an_hour_and_runs_a_local_image(
    docker_engine: DockerEngine,
    module_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = make_runner(docker_engine, tmp_path, pull_policy="hourly")
    pulls: list[str] = []
    original = runner.images._pull

    def counting(image: str) -> None:
        pulls.append(image)
        original(image)  # no registry is reachable: fails, and the local image is used

    monkeypatch.setattr(runner.images, "_pull", counting)
    for index in range(2):
        run = make_run(tmp_path, module_image, run_id=f"hourly-a1-s{index}")
        handle = runner.launch(run)
        assert wait_outcome(runner, handle).succeeded
        runner.cleanup(handle)
    assert pulls == [module_image]
    state = json.loads((tmp_path / "state" / "pulls.json").read_text())
    assert abs(state[module_image] - time.time()) < 600


def test_root_only_with_support_root_modules(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path)
    refused = make_run(tmp_path, module_image, run_id="root-a1-s0", requires_root=True)
    with pytest.raises(RunnerError, match="support_root_modules is false"):
        runner.launch(refused)
    run = replace(
        make_run(tmp_path, module_image, run_id="root-a1-s1", requires_root=True), allow_root=True
    )
    handle = runner.launch(run)
    assert wait_outcome(runner, handle).succeeded
    assert result_of(run)["uid"] == 0
    assert all(p.stat().st_uid == os.geteuid() for p in run.output_folder.iterdir())
    runner.cleanup(handle)


def test_output_of_another_user_is_given_back(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path, user="4321:4322")
    run = make_run(tmp_path, module_image)
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.succeeded, outcome
    assert result_of(run)["uid"] == 4321 and result_of(run)["gid"] == 4322
    for path in [run.output_folder, *run.output_folder.iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (os.geteuid(), os.getegid())
    runner.cleanup(handle)


def test_the_chown_helper_container_gives_files_back(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """The path of a router that is not root: ``chown -R`` as root in a helper container."""
    runner = make_runner(docker_engine, tmp_path)
    run = make_run(tmp_path, module_image)
    handle = runner.launch(run)
    assert wait_outcome(runner, handle).succeeded
    (run.output_folder / "sub").mkdir()
    (run.output_folder / "sub" / "deep.txt").write_text("x")
    for path in [run.output_folder, *run.output_folder.rglob("*")]:
        os.lchown(path, 1234, 1234)
    attrs = docker_client.api.inspect_container(json.loads(handle)["container"])
    owner = f"{os.geteuid()}:{os.getegid()}"
    runner._chown_in_container(attrs, attrs["Config"]["Labels"], run.output_folder, owner)
    for path in [run.output_folder, *run.output_folder.rglob("*")]:
        assert path.stat().st_uid == os.geteuid(), path
    runner.cleanup(handle)
    assert docker_client.containers.list(all=True, filters={"name": "chown"}) == []


def test_docker_arguments_and_additional_volumes_reach_the_container(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    base = tmp_path / "volumes"
    (base / "models").mkdir(parents=True)
    (base / "models" / "weights.txt").write_text("the weights")
    runner = make_runner(docker_engine, tmp_path, volume_bases=[str(base)])
    volumes = {str(base / "models"): {"bind": "/models", "mode": "ro"}}
    run = make_run(
        tmp_path,
        module_image,
        env={"EXTRA_FILE": "/models/weights.txt"},
        additional_volumes=json.dumps(volumes),
        docker_arguments=json.dumps({"shm_size": "32m", "working_dir": "/tmp"}),
    )
    handle = runner.launch(run)
    assert wait_outcome(runner, handle).succeeded
    assert result_of(run)["extra"].strip() == "the weights"
    (container,) = containers_of(docker_client, run.run_id)
    assert container.attrs["HostConfig"]["ShmSize"] == 32 * 1024 * 1024
    assert container.attrs["Config"]["WorkingDir"] == "/tmp"
    runner.cleanup(handle)

    outside = make_run(
        tmp_path,
        module_image,
        run_id="vol-a1-s0",
        additional_volumes=json.dumps({"/etc": {"bind": "/host-etc"}}),
    )
    with pytest.raises(RunnerError, match="additional_volumes: /etc: not below an allowed"):
        runner.launch(outside)
    link = base / "escape"
    link.symlink_to("/etc")
    sneaky = make_run(
        tmp_path,
        module_image,
        run_id="vol-a1-s1",
        additional_volumes=json.dumps({str(link): {"bind": "/host-etc"}}),
    )
    with pytest.raises(RunnerError, match="leads to /etc"):
        runner.launch(sneaky)
    privileged = make_run(
        tmp_path, module_image, run_id="arg-a1-s0", docker_arguments='{"privileged": true}'
    )
    with pytest.raises(RunnerError, match="privileged: not an allowed docker argument"):
        runner.launch(privileged)


def test_a_new_instance_removes_containers_whose_job_moved_on(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path, docker_client: Any
) -> None:
    runner = make_runner(docker_engine, tmp_path, name="sweeper")
    run = make_run(tmp_path, module_image, run_id="left-a1-s0")
    handle = runner.launch(run)
    assert wait_outcome(runner, handle).succeeded
    kept = make_run(tmp_path, module_image, run_id="kept-a1-s0")
    kept_handle = runner.launch(kept)
    assert wait_outcome(runner, kept_handle).succeeded
    # The processor recorded the outcome and was killed before cleanup; the job moved on.
    (tmp_path / "job" / run.run_id).rename(tmp_path / "job-done")
    runner.close()
    make_runner(docker_engine, tmp_path, name="sweeper")
    labelled = docker_client.containers.list(all=True, filters={"label": f"{L_RUNNER}=sweeper"})
    assert [c.name for c in labelled] == ["mercure-kept-a1-s0"]
    runner.cleanup(kept_handle)


def test_the_end_of_a_long_log_is_kept(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path, max_log_bytes=2048)
    run = make_run(tmp_path, module_image, env={"BEHAVIOUR": "chatty"})
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.succeeded, outcome
    assert outcome.log.startswith("[... ") and "earlier bytes not kept" in outcome.log
    assert outcome.log.rstrip().endswith("copied 2 instance(s)")
    assert "line 0 of" not in outcome.log and len(outcome.log) < 2200
    runner.cleanup(handle)


def test_a_module_over_its_memory_limit_fails_with_the_reason(
    docker_engine: DockerEngine, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path, mem_limit="32m")
    run = make_run(
        tmp_path,
        module_image,
        env={"BEHAVIOUR": "hungry"},
        docker_arguments=json.dumps({"memswap_limit": "32m"}),
    )
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.exit_code is None, outcome
    assert outcome.error == "killed by the kernel: out of memory (memory limit 32 MiB)"
    assert "taking 200 MB" in outcome.log
    runner.cleanup(handle)


def test_an_unreachable_engine_is_unavailable_so_launched_again(
    tmp_path: Path, module_image: str
) -> None:
    settings = DockerRunnerSettings(docker_url=f"unix://{tmp_path}/nothing.sock", api_timeout=5)
    runner = DockerRunner("docker", settings, PluginContext("runner", "docker"))
    runner.start()  # logs the problem; the processor goes on and the runs say why
    run = make_run(tmp_path, module_image)
    with pytest.raises(RunnerUnavailable, match="cannot reach the docker engine at unix://"):
        runner.launch(run)
    handle = json.dumps({"container": "0123456789ab", "name": "mercure-x"})
    with pytest.raises(RunnerError, match="cannot reach the docker engine"):
        runner.wait(handle, 0.1)
    with pytest.raises(RunnerError, match="cannot reach the docker engine"):
        runner.cancel(handle)
    runner.close()


def test_a_monai_application_package_runs_its_manifest_command_as_root(
    docker_engine: DockerEngine, monai_image: str, module_image: str, tmp_path: Path
) -> None:
    runner = make_runner(docker_engine, tmp_path)
    with pytest.raises(RunnerError, match="MONAI Application Package, which runs as root"):
        runner.launch(make_run(tmp_path, monai_image, run_id="map-a1-s0"))
    run = replace(make_run(tmp_path, monai_image, run_id="map-a1-s1"), allow_root=True)
    handle = runner.launch(run)
    outcome = wait_outcome(runner, handle)
    assert outcome.succeeded, outcome
    assert result_of(run)["uid"] == 0 and result_of(run)["copied"] == 2
    assert all(p.stat().st_uid == os.geteuid() for p in run.output_folder.iterdir())
    runner.cleanup(handle)
    assert runner.images.monai_manifest(module_image) is None  # an ordinary image
