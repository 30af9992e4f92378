"""Delivery to a dead or partly failing target: retries, error/, manual retry, partial resend.

The router runs as a ``mercure run`` subprocess; instances come from DCMTK's storescu. The
partly failing target is a site plugin (``site_plugins/e2e_flaky_target.py``) loaded through
the configuration's ``plugin_folder``, as an operator would add one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    SITE_PLUGINS,
    MercureProcess,
    ProcessFactory,
    folder_of,
    read_task,
    run_cli,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import dataset_bytes, make_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]

RETRY_DELAY = 1
RETRY_MAX = 2
# Slack for the instructions between the attempt's timestamp and the retry's computation.
CLOCK_SLACK = 0.5


def only_job(folder: Path) -> Path | None:
    jobs = visible_entries(folder)
    assert len(jobs) <= 1, f"expected at most one job in {folder}, found {jobs}"
    return jobs[0] if jobs else None


def job_task(folder: Path, job_id: str) -> dict[str, Any] | None:
    return read_task(folder / job_id)


def test_dead_target_retries_then_error_then_manual_retry_delivers(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    archive = tmp_path / "archive"  # does not exist yet: the target is "down"
    config = spool_config(
        tmp_path,
        retry_delay=RETRY_DELAY,
        retry_max=RETRY_MAX,
        targets={"archive": {"target_type": "folder", "folder": str(archive)}},
        rules={"all": {"rule": "True", "target": "archive"}},
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    outgoing, error, success = (folder_of(config, n) for n in ("outgoing", "error", "success"))
    router = mercure_processes.start("router", "run", "--config", str(config_path))
    series = make_series(tmp_path / "series", 3)
    storescu(series, config["port"])

    # Watch the job's task file between its attempts, until it lands in error/.
    seen: dict[int, dict[str, Any]] = {}

    def watch() -> str | None:
        job = only_job(outgoing)
        if job is not None:
            task = read_task(job)
            if task is not None:
                retries = int(task["dispatch"]["retries"] or 0)
                # (The last try's task file is written with its error just before the move.)
                if retries and retries not in seen and task["error"] is None:
                    seen[retries] = task["dispatch"]
        failed = only_job(error)
        return failed.name if failed is not None else None

    job_id = _wait(router, watch, 60, "the job to land in error/")
    task = job_task(error, job_id)
    assert task is not None
    dispatch = task["dispatch"]

    # retry_max=2: the first try and two retries, then error/ with the reason.
    assert dispatch["retries"] == RETRY_MAX + 1
    attempts = dispatch["attempts"]
    assert len(attempts) == RETRY_MAX + 1
    assert all(a["target"] == "archive" and a["delivered"] == 0 for a in attempts)
    assert all(a["failed"] == len(series) for a in attempts)
    assert all("does not exist" in a["error"] for a in attempts)
    assert task["error"] and "archive" in task["error"] and "does not exist" in task["error"]
    assert str(archive) in task["error"]
    assert set(dispatch["failed"]["archive"]) == {p.name for p in series}

    # Growing delays: after try n the next one is due retry_delay * 2^(n-1) later, +-20 %.
    assert sorted(seen) == list(range(1, RETRY_MAX + 1)), f"tries observed: {sorted(seen)}"
    for n in range(1, RETRY_MAX + 1):
        snapshot = seen[n]
        assert len(snapshot["attempts"]) == n
        attempt_at = snapshot["attempts"][-1]["at"]
        assert attempt_at == attempts[n - 1]["at"]
        wait = snapshot["next_retry_at"] - attempt_at
        base = RETRY_DELAY * 2 ** (n - 1)
        assert 0.8 * base <= wait <= 1.2 * base + CLOCK_SLACK, f"try {n}: waits {wait:.3f} s"
        # ... and the dispatcher did not try again before it was due.
        assert attempts[n]["at"] >= snapshot["next_retry_at"]

    # An operator sends it again; it goes back to outgoing/ with its tries reset.
    retried = run_cli("job", "retry", job_id, "--config", str(config_path), cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert "outgoing" in retried.stdout
    assert not (error / job_id).exists()

    def failed_again() -> dict[str, Any] | None:
        t = job_task(outgoing, job_id)
        return t if t is not None and t["dispatch"]["retries"] == 1 else None

    task = _wait(router, failed_again, 30, "a new try after the manual retry")
    assert task["error"] is None
    assert any("manual retry" in line for line in task["history"])

    # The target comes back: the next try delivers.
    archive.mkdir()
    _wait(router, lambda: (success / job_id).is_dir(), 30, "the job in success/")
    task = job_task(success, job_id)
    assert task is not None
    assert sorted(task["dispatch"]["delivered"]["archive"]) == sorted(p.name for p in series)
    assert task["dispatch"]["failed"] == {}
    for path in series:
        assert dataset_bytes(archive / job_id / path.name) == dataset_bytes(path)
    assert visible_entries(outgoing) == [] and visible_entries(error) == []
    assert router.terminate() == 0


def test_partial_failure_resends_only_the_failed_instances(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    delivered_to = tmp_path / "flaky"
    journal = tmp_path / "journal.jsonl"
    fail_list = tmp_path / "fail.txt"
    config = spool_config(
        tmp_path,
        retry_delay=RETRY_DELAY,
        retry_max=5,
        plugin_folder=str(SITE_PLUGINS),
        targets={
            "flaky": {
                "target_type": "e2e_flaky",
                "folder": str(delivered_to),
                "journal": str(journal),
                "fail_list": str(fail_list),
            }
        },
        rules={"all": {"rule": "True", "target": "flaky"}},
    )
    config_path = write_config(tmp_path / "mercure.json", config)
    outgoing, success = folder_of(config, "outgoing"), folder_of(config, "success")
    series = make_series(tmp_path / "series", 6)
    names = {p.name for p in series}
    failing = {series[1].name, series[4].name}
    fail_list.write_text("\n".join(sorted(failing)) + "\n")

    router = mercure_processes.start("router", "run", "--config", str(config_path))
    storescu(series, config["port"])

    def first_try_done() -> dict[str, Any] | None:
        job = only_job(outgoing)
        task = read_task(job) if job is not None else None
        return task if task is not None and task["dispatch"]["retries"] == 1 else None

    task = _wait(router, first_try_done, 60, "the first, partly failed try")
    job_id = task["id"]
    dispatch = task["dispatch"]
    assert set(dispatch["delivered"]["flaky"]) == names - failing
    assert set(dispatch["failed"]["flaky"]) == failing
    assert set(dispatch["failed"]["flaky"].values()) == {"refused by the test target"}

    fail_list.unlink()  # the target accepts everything from now on
    _wait(router, lambda: (success / job_id).is_dir(), 30, "the job in success/")

    calls = [json.loads(line) for line in journal.read_text().splitlines()]
    assert all(c["task_id"] == job_id for c in calls)
    assert set(calls[0]["asked"]) == names
    for call in calls[1:]:
        assert set(call["asked"]) <= failing, f"resent an instance already delivered: {call}"
    deliveries = [name for c in calls for name in c["delivered"]]
    assert sorted(deliveries) == sorted(names), "each instance must be delivered exactly once"

    task = job_task(success, job_id)
    assert task is not None
    assert sorted(task["dispatch"]["delivered"]["flaky"]) == sorted(names)
    assert task["dispatch"]["failed"] == {}
    for path in series:
        assert dataset_bytes(delivered_to / job_id / path.name) == dataset_bytes(path)
    assert router.terminate() == 0


def _wait(router: MercureProcess, condition: Any, timeout: float, what: str) -> Any:
    try:
        return wait_until(condition, timeout, what, interval=0.02)
    except AssertionError:
        print(router.output())
        raise
