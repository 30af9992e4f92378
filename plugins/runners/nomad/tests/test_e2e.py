"""The whole router with the nomad runner: ``mercure run`` processes with the Nomad stand-in.

DICOM instances go in over a real association (pynetdicom), the router's processor runs the
rule's modules through the nomad runner, and the stand-in runs each dispatched task's work
(``modules/relabel.py``, the entry point of the module "image") in the spool, which lies in
the folder the router and the clients share (the clients see it at another path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pydicom
import pytest
from mercure.testing import free_port, make_series, store_instances, wait_for
from nomad_standin import NomadStandIn
from nomad_testing import Shared

pytestmark = pytest.mark.slow

RELABEL = Path(__file__).parent / "modules" / "relabel.py"
IMAGE = "example/relabel:1"
SPOOL = ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")


def mercure_exe() -> str:
    beside = Path(sys.executable).parent / "mercure"
    found = str(beside) if beside.exists() else shutil.which("mercure")
    if found is None:
        pytest.fail("the mercure command is not installed next to this Python")
    return found


class Router:
    """One ``mercure run`` process, its output in a log file; stopped by its PID."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Router:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        offset = self.log_path.stat().st_size
        env = {k: v for k, v in os.environ.items() if k not in ("MERCURE_CONFIG", "MERCURE_DATA")}
        env.update(MERCURE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [mercure_exe(), "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"mercure run exited with {self.proc.returncode}:\n{self.output()}")
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return b"services started" in fh.read()

        wait_for(started, timeout=60, what="mercure run to start")
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[list[Router]]:
    started: list[Router] = []
    yield started
    for router in started:
        router.kill()
        router.stop()


def write_config(
    tmp_path: Path, shared: Shared, standin: NomadStandIn, **overrides: Any
) -> tuple[Path, dict[str, Any]]:
    data: dict[str, Any] = {f"{n}_folder": str(shared.router / "spool" / n) for n in SPOOL}
    data.update(
        port=free_port(),
        series_complete_trigger=1,
        router_scan_interval=1,
        dispatcher_scan_interval=1,
        cleaner_scan_interval=1,
        dicom_receiver={"bind_address": "127.0.0.1"},
        process_runner="nomad",
        plugins={
            "runners": {
                "nomad": {
                    "address": standin.address,
                    "shared_folders": {str(shared.router): str(shared.client)},
                    "datacenters": ["dc1"],
                    "poll_interval": 0.2,
                }
            }
        },
    )
    data.update(overrides)
    path = tmp_path / "mercure.json"
    path.write_text(json.dumps(data, indent=2))
    return path, data


def jobs_in(folder: Path) -> dict[str, dict[str, Any]]:
    found = {}
    if folder.is_dir():
        for job in folder.iterdir():
            task = job / "task.json"
            if job.is_dir() and task.exists():
                found[job.name] = json.loads(task.read_text())
    return found


def job_of_rule(folder: Path, rule: str) -> tuple[str, dict[str, Any]] | None:
    for job_id, task in jobs_in(folder).items():
        if task["info"].get("applied_rule") == rule:
            return job_id, task
    return None


@pytest.fixture
def e2e_standin(standin: NomadStandIn) -> NomadStandIn:
    standin.cluster.images[IMAGE] = [sys.executable, str(RELABEL)]
    return standin


def test_a_process_rule_with_a_chain_runs_one_dispatch_per_step(
    tmp_path: Path, shared: Shared, e2e_standin: NomadStandIn, routers: list[Router]
) -> None:
    standin = e2e_standin
    config, data = write_config(
        tmp_path,
        shared,
        standin,
        modules={
            "first": {"docker_tag": IMAGE, "settings": {"label": "STEP1"}},
            "second": {"docker_tag": IMAGE, "settings": {"label": "STEP2"}},
            "broken": {"docker_tag": IMAGE, "settings": {"exit_code": 2}},
        },
        rules={
            "chain": {
                "rule": "tags.SeriesDescription == 'chain'",
                "action": "process",
                "processing_module": ["first", "second"],
                "processing_settings": [{}, {"label": "FINAL"}],
            },
            "fails": {
                "rule": "tags.SeriesDescription == 'fails'",
                "action": "process",
                "processing_module": "broken",
            },
        },
    )
    routers.append(Router(config, tmp_path / "router.log").start())
    chain = make_series(tmp_path / "in" / "chain", 3, series_description="chain")
    fails = make_series(tmp_path / "in" / "fails", 2, series_description="fails")
    store_instances(chain + fails, data["port"])

    success = Path(data["success_folder"])
    error = Path(data["error_folder"])
    found = wait_for(lambda: job_of_rule(success, "chain"), timeout=90, what="the chain's job")
    job_id, task = found
    assert task["process"][1]["output"] == {"module": "second", "written": 3}
    outputs = sorted((success / job_id).glob("*.dcm"))
    assert len(outputs) == 3
    assert {str(pydicom.dcmread(p).SeriesDescription) for p in outputs} == {"FINAL"}
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in chain}
    assert not sent & {str(pydicom.dcmread(p).SOPInstanceUID) for p in outputs}
    record = json.loads((success / job_id / "processing.json").read_text())
    assert [s["exit_code"] for s in record["steps"]] == [0, 0]
    assert [s["runner"] for s in record["steps"]] == ["nomad", "nomad"]
    for step in record["steps"]:
        handle = json.loads(step["handle"])
        assert "/dispatch-" in handle["job"]
        log = (success / job_id / step["log_file"]).read_text()
        assert "wrote 3 instance(s)" in log
    # One dispatch per step, each of its own module's job, each with the job's own folders
    # (as the clients see them) in its meta; the dispatched jobs were purged afterwards.
    dispatches = [r.body for r in standin.calls("POST", "/v1/job/") if r.path.endswith("/dispatch")]
    chain_runs = [b for b in dispatches if b["Meta"]["mercure_task_id"] == job_id]
    assert [b["Meta"]["mercure_step"] for b in chain_runs] == ["0", "1"]
    assert all(b["Meta"]["mercure_in"].startswith(str(shared.client)) for b in chain_runs)
    purged = standin.calls("DELETE", "/v1/job/")
    assert len([r for r in purged if r.query.get("purge") == "true"]) >= 2
    wait_for(lambda: not standin.dispatched(), timeout=30, what="the purge of every dispatch")

    # The failing module: its job is in error/ with the exit code and the module's log.
    failed = wait_for(lambda: job_of_rule(error, "fails"), timeout=60, what="the failed job")
    _failed_id, failed_task = failed
    assert failed_task["info"]["fail_stage"] == "PROCESSING"
    assert "module 'broken'" in failed_task["error"]
    assert "exited with code 2" in failed_task["error"]
    assert "fails on purpose" in failed_task["error"]  # the log tail, from Nomad's logs API
    # The runner's polling does not flood the router's log with httpx's request lines.
    assert "HTTP Request" not in routers[0].output()
    # Each module's job was registered once.
    parents = {p.body["Job"]["ID"] for p in standin.calls("PUT", "/v1/jobs")}
    assert {p.split("-")[1] for p in parents} == {"first", "second", "broken"}


def test_a_processor_killed_while_nomad_runs_the_module_follows_it_after_restart(
    tmp_path: Path, shared: Shared, e2e_standin: NomadStandIn, routers: list[Router]
) -> None:
    standin = e2e_standin
    runs_log = tmp_path / "runs.log"
    config, data = write_config(
        tmp_path,
        shared,
        standin,
        modules={
            "slow": {
                "docker_tag": IMAGE,
                "settings": {"label": "SLOW", "sleep": 4, "runs_log": str(runs_log)},
            }
        },
        rules={
            "slow": {"rule": "True", "action": "process", "processing_module": "slow"},
        },
    )
    first = Router(config, tmp_path / "router.log").start()
    routers.append(first)
    store_instances(make_series(tmp_path / "in", 2, series_description="slow"), data["port"])
    wait_for(runs_log.exists, timeout=60, what="the module to start in Nomad")
    first.kill()  # the processor dies while the task runs; the Nomad job runs on

    routers.append(Router(config, tmp_path / "router.log").start())
    success = Path(data["success_folder"])
    found = wait_for(lambda: job_of_rule(success, "slow"), timeout=90, what="the job in success/")
    job_id, _task = found
    assert len(list((success / job_id).glob("*.dcm"))) == 2
    assert runs_log.read_text().splitlines() == [f"start {job_id} slow"], "ran exactly once"
    dispatched = [r for r in standin.calls("POST", "/v1/job/") if r.path.endswith("/dispatch")]
    assert len({r.body["IdempotencyToken"] for r in dispatched}) == 1
