"""The processing contract through the docker runner, with ``mercure run`` and real DICOM traffic.

Series go in with DCMTK's storescu; ``mercure run`` processes (the whole router, or the
processor on its own) run the busybox module image of ``conftest.py`` as containers on the
engine the tests started, with ``process_runner: "docker"``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pydicom
import pytest
from docker_support import DockerEngine, MercureProcess, jobs_in, mercure_processes, read_json
from docker_support import spool_config as base_config
from mercure.testing import dcmtk_storescu, make_series, wait_for
from mercure_runner_docker.runner import L_RUNNER

pytestmark = [pytest.mark.peer, pytest.mark.slow]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., MercureProcess]]:
    with mercure_processes(tmp_path) as start:
        yield start


def spool_config(
    tmp_path: Path,
    engine: DockerEngine,
    modules: dict[str, Any],
    rules: dict[str, Any],
    **more: Any,
) -> tuple[dict[str, Any], Path]:
    config = base_config(
        tmp_path,
        process_runner="docker",
        plugins={"runners": {"docker": {"docker_url": engine.url, "kill_grace": 2}}},
        modules=modules,
        rules=rules,
        **more,
    )
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(config, indent=2))
    return config, path


def folder(config: dict[str, Any], name: str) -> Path:
    return Path(config[f"{name}_folder"])


def containers(client: docker.DockerClient) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{L_RUNNER}=docker"})


def send(tmp_path: Path, port: int, description: str, count: int) -> list[Path]:
    files = make_series(tmp_path / "in" / description, count, series_description=description)
    dcmtk_storescu(files, port)
    return files


def uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_process_and_both_rules_run_the_container_confined(
    tmp_path: Path,
    docker_engine: DockerEngine,
    module_image: str,
    docker_client: docker.DockerClient,
    processes: Callable[..., MercureProcess],
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    config, path = spool_config(
        tmp_path,
        docker_engine,
        modules={"busy": {"docker_tag": module_image, "settings": {"marker": "from-module"}}},
        rules={
            "proc": {
                "rule": "tags.SeriesDescription == 'proc'",
                "action": "process",
                "processing_module": "busy",
                "processing_settings": {"marker": "from-rule"},
            },
            "both": {
                "rule": "tags.SeriesDescription == 'both'",
                "action": "both",
                "target": "archive",
                "processing_module": "busy",
            },
        },
        targets={"archive": {"target_type": "folder", "folder": str(archive)}},
    )
    router = processes("router", "run", "--config", str(path))
    sent = send(tmp_path, config["port"], "proc", 3)
    send(tmp_path, config["port"], "both", 2)
    success = folder(config, "success")

    def proc_job() -> str | None:
        for job_id, task in jobs_in(success).items():
            if task["info"].get("applied_rule") == "proc":
                return job_id
        return None

    job_id = wait_for(proc_job, 90, what="the process job in success/")
    job = success / job_id
    outputs = sorted(job.glob("*.dcm"))
    assert len(outputs) == 3 and uids(outputs) == uids(sent)  # the module copies its input
    result = read_json(job / "result.json")
    assert result["uid"] != 0 and result["uid"] == (os.geteuid() or 65534)  # not root
    assert "unreachable" in result["network"].lower()  # no network in the container
    assert result["marker"] == "from-rule"  # the rule's processing_settings, via task.json
    assert result["copied"] == 3 and result["in_dir"] == "/tmp/data"
    assert all(p.stat().st_uid == os.geteuid() for p in job.iterdir())
    record = read_json(job / "processing.json")
    (step,) = record["steps"]
    assert step["runner"] == "docker" and step["exit_code"] == 0
    assert json.loads(step["handle"])["name"] == f"mercure-{step['run_id']}"
    assert "copied 3 instance(s)" in (job / step["log_file"]).read_text()

    wait_for(lambda: len(list(archive.glob("*/*.dcm"))) == 2, 60, what="both: the delivery")
    wait_for(lambda: containers(docker_client) == [], 30, what="no container left")
    assert router.terminate() == 0


def test_a_timeout_stops_and_removes_the_container(
    tmp_path: Path,
    docker_engine: DockerEngine,
    module_image: str,
    docker_client: docker.DockerClient,
    processes: Callable[..., MercureProcess],
) -> None:
    config, path = spool_config(
        tmp_path,
        docker_engine,
        modules={
            "hang": {
                "docker_tag": module_image,
                "environment": json.dumps({"BEHAVIOUR": "stubborn"}),
                "timeout": 3,
            }
        },
        rules={"all": {"rule": "True", "action": "process", "processing_module": "hang"}},
    )
    router = processes("router", "run", "--config", str(path))
    sent = send(tmp_path, config["port"], "hang", 2)
    error = folder(config, "error")
    (job_id,) = wait_for(lambda: list(jobs_in(error)), 90, what="the job in error/")
    task = jobs_in(error)[job_id]
    assert (
        "module 'hang' did not finish within its timeout of 3 s and was stopped" in (task["error"])
    )
    assert "ignoring SIGTERM" in task["error"]  # the log tail: it needed SIGKILL
    assert task["info"]["fail_stage"] == "PROCESSING"
    assert uids(sorted((error / job_id).glob("*.dcm"))) == uids(sent)  # inputs kept
    wait_for(lambda: containers(docker_client) == [], 30, what="no container left")
    assert router.terminate() == 0


def test_a_processor_killed_mid_run_reattaches_and_the_job_completes_once(
    tmp_path: Path,
    docker_engine: DockerEngine,
    module_image: str,
    docker_client: docker.DockerClient,
    processes: Callable[..., MercureProcess],
) -> None:
    persistence = tmp_path / "persistence"
    config, path = spool_config(
        tmp_path,
        docker_engine,
        modules={
            "slow": {
                "docker_tag": module_image,
                "requires_persistence": True,
                "environment": json.dumps({"SLEEP": "4", "RUNS": "/tmp/persistence/runs.txt"}),
            }
        },
        rules={"all": {"rule": "True", "action": "process", "processing_module": "slow"}},
        persistence_folder=str(persistence),
    )
    runs = persistence / "slow" / "runs.txt"
    front = processes("front", "run", "--config", str(path), "--only", "receiver,router")
    processor = processes("processor", "run", "--config", str(path), "--only", "processor")
    send(tmp_path, config["port"], "slow", 2)
    wait_for(lambda: runs.exists() and "start" in runs.read_text(), 60, what="the module start")
    processing = folder(config, "processing")
    (job,) = [p for p in processing.iterdir() if not p.name.startswith(".") and p.is_dir()]

    def handle() -> str | None:
        record = read_json(job / "processing.json")
        return record["steps"][0]["handle"] if record else None

    written = wait_for(handle, 10, what="the run's handle in processing.json")
    processor.kill()  # SIGKILL in the middle of the module's run
    assert "end" not in runs.read_text(), "the module finished before the kill"
    container = docker_client.containers.get(json.loads(written)["container"])
    assert container.status == "running"  # the container outlives its processor
    time.sleep(0.5)
    processor = processes("processor-again", "run", "--config", str(path), "--only", "processor")
    success = folder(config, "success")
    wait_for(lambda: (success / job.name).is_dir(), 60, what="the job in success/")

    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["start", "end"]
    record = read_json(success / job.name / "processing.json")
    assert record["steps"][0]["handle"] == written and record["attempt"] == 1
    assert len(list((success / job.name).glob("*.dcm"))) == 2
    wait_for(lambda: containers(docker_client) == [], 30, what="no container left")
    for proc in (front, processor):
        assert proc.terminate() == 0
